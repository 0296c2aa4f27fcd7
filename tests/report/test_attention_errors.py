"""Bad inputs to the attention figures fail with one-line brainenc errors that are still ValueErrors."""
import numpy as np
import pytest

from brainenc.exceptions import BrainencError, ConfigError, DataFormatError
from brainenc.report.attention import maps_by_query, plot_attention_maps, plot_top_images

NAMES = ["V1", "V2", "FFA"]


def _attn(n=2, q=3, heads=None):
    shape = (n, q, 4, 4) if heads is None else (n, heads, q, 4, 4)
    return np.random.default_rng(0).random(shape)


def _images(n=2, h=8, w=8):
    return np.zeros((n, h, w, 3), np.uint8)


def _check(exc_info):
    err = exc_info.value
    assert isinstance(err, BrainencError) and isinstance(err, ValueError)
    assert "\n" not in str(err)


def test_maps_by_query_names_each_query():
    maps = maps_by_query(_attn(heads=2), NAMES)
    assert list(maps) == NAMES and maps["FFA"].shape == (2, 2, 4, 4)


@pytest.mark.parametrize("attn", [_attn(q=2), _attn(q=4, heads=2), np.zeros((2, 3, 4))])
def test_attention_of_the_wrong_shape_is_a_data_format_error(attn):
    with pytest.raises(DataFormatError, match=r"'attn' must be \[n, Q, h, w\] or \[n, H, Q, h, w\] with Q = "
                                              r"len\(names\) = 3; got shape") as exc:
        maps_by_query(attn, NAMES)
    _check(exc)


def test_duplicate_query_names_are_a_config_error():
    with pytest.raises(ConfigError, match=r"'names' must be unique; \['V1'\] appear more than once") as exc:
        maps_by_query(_attn(), ["V1", "V2", "V1"])
    _check(exc)


def test_images_that_do_not_match_the_attention_are_a_data_format_error(tmp_path):
    for images in (_images(n=3), _images()[..., :1], _images()[0]):
        with pytest.raises(DataFormatError, match=r"'images' must be \[n, H, W, 3\] with n = len\(attn\) = 2") as exc:
            plot_attention_maps(images, _attn(), NAMES, tmp_path / "figs")
        _check(exc)
    assert not (tmp_path / "figs").exists()


def test_unknown_queries_are_a_config_error(tmp_path):
    match = r"'queries' must be a subset of 'names'; \['V4'\] are not query names"
    with pytest.raises(ConfigError, match=match) as exc:
        plot_attention_maps(_images(), _attn(), NAMES, tmp_path / "figs", queries=["V1", "V4"])
    _check(exc)
    assert not (tmp_path / "figs").exists()


def test_responses_of_the_wrong_shape_are_a_data_format_error(tmp_path):
    with pytest.raises(DataFormatError, match=r"'responses' must be \[n_images, len\(names\)\] = \[2, 3\]; "
                                              r"got shape \(2, 2\)") as exc:
        plot_top_images(_images(), np.zeros((2, 2)), NAMES, tmp_path / "top.png")
    _check(exc)
    assert not (tmp_path / "top.png").exists()
