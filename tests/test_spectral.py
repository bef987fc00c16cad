import re

import numpy as np
import pytest

from geobatch.errors import UnknownModel, UnsupportedPrompt
from geobatch.models.base import MODELS, Prompt, Segmenter, TileInput, load_model
from geobatch.tiling import TileGrid, plan_tiles


def prompt(text: str, kind: str = "class") -> Prompt:
    return Prompt(text, kind, text.split()[0])


def tile_input(green, nir, red=None, valid=None) -> TileInput:
    green, nir = np.asarray(green, np.uint8), np.asarray(nir, np.uint8)
    (tile,) = plan_tiles("t", green.shape, TileGrid(64, 0))
    bands = {"green": green, "nir": nir, "red": np.asarray(red if red is not None else green, np.uint8)}
    return TileInput(tile, bands, np.ones(green.shape, bool) if valid is None else np.asarray(valid, bool))


def test_registry_loads_spectral_and_names_the_choices_for_unknown_models():
    assert isinstance(load_model("spectral"), Segmenter)
    with pytest.raises(UnknownModel, match=re.escape(f"unknown model 'samm'; choose from {sorted(MODELS)}")):
        load_model("samm")
    assert {"spectral", "sam"} <= set(MODELS)


@pytest.mark.parametrize(
    "text, cls", [("segment all water bodies", "water"), ("Ponds and lakes", "water"), ("trees", "vegetation")]
)
def test_prompts_map_to_classes_by_keyword(text, cls):
    assert load_model("spectral").resolve(prompt(text)).name == cls


def test_an_unanswerable_prompt_lists_what_the_model_can_do():
    with pytest.raises(UnsupportedPrompt, match=r"'buildings' matches no class.*water.*vegetation"):
        load_model("spectral").resolve(prompt("buildings"))
    with pytest.raises(UnsupportedPrompt, match="ambiguous"):
        load_model("spectral").resolve(prompt("water and trees"))
    with pytest.raises(UnsupportedPrompt, match="only 'class' prompts"):
        load_model("spectral").resolve(prompt("the lake in the north", kind="referring"))


def test_required_bands_follow_the_prompts():
    model = load_model("spectral")
    assert model.required_bands([prompt("water")]) == ("green", "nir")
    assert set(model.required_bands([prompt("water"), prompt("forest")])) == {"green", "nir", "red"}


def test_water_is_where_green_exceeds_nir_and_never_on_invalid_pixels():
    model = load_model("spectral")
    tile = tile_input(green=[[90, 10, 50], [0, 200, 80]], nir=[[10, 90, 50], [0, 10, 20]], valid=[[1, 1, 1], [1, 1, 0]])
    (instance,) = model(tile, [prompt("water")]).instances["water"]
    assert instance.mask.tolist() == [[True, False, False], [False, True, False]]
    assert instance.score_map[instance.mask].min() >= 0.5 and instance.score_map.max() <= 1.0
    assert instance.score == pytest.approx(instance.score_map[instance.mask].mean())


def test_no_water_gives_no_instance_and_thresholds_are_options():
    dry = tile_input(green=[[10, 20]], nir=[[90, 90]])
    assert load_model("spectral")(dry, [prompt("water")]).instances["water"] == []
    faint = tile_input(green=[[55]], nir=[[45]])  # NDWI = 0.1
    assert load_model("spectral", {"thresholds": {"water": 0.2}})(faint, [prompt("water")]).instances["water"] == []
    with pytest.raises(UnsupportedPrompt, match="no class"):
        load_model("spectral", {"thresholds": {"snow": 0.1}})
