"""The export's model card says how to load what it describes: peft for PEFT adapters, sftkit for our own formats."""

from __future__ import annotations

import pytest

from trainer.config import load_config
from trainer.model_card import model_card


@pytest.mark.parametrize("sets, library, loader", [
    (["peft.pet_type=lora"], "peft", "PeftModel.from_pretrained"),
    (["peft.pet_type=lora", "peft.use_mora=true"], "sftkit", "trainer generate --model base/ --adapter"),
    (["peft.pet_type=loreft"], "sftkit", "trainer generate --model base/ --adapter"),
])
def test_card_names_the_library_that_loads_the_adapter(tmp_path, sets, library, loader):
    config = load_config(None, [f"model.path={tmp_path}", "data.train=[]", *sets])
    card = model_card(config, base_model="base/", step=3, kind="adapter")
    assert f"library_name: {library}" in card
    assert loader in card
    assert ("peft cannot load this adapter" in card) == (library == "sftkit")


def test_full_weights_card_uses_transformers(tmp_path):
    config = load_config(None, [f"model.path={tmp_path}", "data.train=[]"])
    card = model_card(config, base_model="base/", step=3, kind="full")
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
