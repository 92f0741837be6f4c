"""`flexora select print=peft`: the selection as a PEFT LoraConfig and axolotl settings."""

from __future__ import annotations

from peft import LoraConfig

from flexora_cli.stages import select


def test_print_peft_gives_the_lora_config_finetune_uses(tiny_cfg, capsys):
    assert select.run(tiny_cfg("select.layers=[2,5]")).layers == [2, 5]
    capsys.readouterr()
    select.run(tiny_cfg("select.layers=[2,5]", "select.print=peft"))  # not a setting of the result
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("LoraConfig("))
    built = eval(line, {"LoraConfig": LoraConfig})  # the printed line is runnable as it is
    cfg = tiny_cfg()
    assert built.layers_to_transform == [2, 5] and built.layers_pattern == "layers"
    assert set(built.target_modules) == set(cfg.model.target_modules)
    assert (built.r, built.lora_alpha) == (cfg.lora.r, cfg.lora.alpha)
    assert "peft_layers_to_transform: [2, 5]" in out and "adapter: lora" in out
