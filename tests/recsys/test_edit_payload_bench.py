"""The payload codec benchmark: every codec carries the same numbers; RSE1's validation
figures are what its format promises (CRC, truncation, NaN, shapes, dtype)."""

from __future__ import annotations

import json

import pytest
import torch

from recsys.edit_payload_bench import (
    CODECS,
    HEAD,
    measure_codec,
    run_payload_benchmark,
    sample_edit,
)


def test_rows_for_every_codec_and_dtype_and_rse1_catches_everything() -> None:
    result = run_payload_benchmark(runs=3, trials=40)
    rows = {(r["codec"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {(c.name, d) for c in CODECS for d in ("fp16", "int8")}
    json.dumps(result, allow_nan=False)  # --json-able as it is
    for dtype in ("fp16", "int8"):
        rse1 = rows[("rse1", dtype)]
        assert rse1["bit_flips_caught_%"] == 100 and rse1["truncations_caught_%"] == 100
        assert rse1["nan_refused"] and rse1["bad_shape_refused"] and rse1["bad_dtype_refused"]
        # neither alternative checks values or shapes against the head by itself
        for other in ("safetensors", "protobuf"):
            assert not rows[(other, dtype)]["nan_refused"]
            assert not rows[(other, dtype)]["bad_shape_refused"]
            assert rows[(other, dtype)]["bit_flips_caught_%"] < 100
    # 3,280 values at rank 8: fp16 and int8 data plus each format's overhead
    assert rows[("rse1", "fp16")]["bytes"] - rows[("rse1", "fp16")]["overhead_B"] == 3280 * 2
    assert rows[("rse1", "int8")]["bytes"] - rows[("rse1", "int8")]["overhead_B"] == 3280


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_each_codec_round_trips_the_edit(codec) -> None:
    edit = sample_edit()
    back = codec.decode(codec.encode(edit, "fp16", (1, 2)))
    assert back.keys() == edit.keys()
    assert back["fc0.u"].shape == (HEAD["fc0"][0], 8) and back["fc0.u"].dtype == torch.float32
    assert all(float((back[k] - edit[k]).abs().max()) < 1e-3 for k in edit)


def test_a_codec_carrying_other_numbers_is_refused() -> None:
    from dataclasses import replace

    lossy = replace(
        CODECS[1], decode=lambda data: {k: v * 0 for k, v in CODECS[1].decode(data).items()}
    )
    with pytest.raises(AssertionError, match="same numbers"):
        measure_codec(lossy, "fp16", runs=1, trials=1, seed=0)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys) -> None:
    from recsys.cli import main

    out = tmp_path / "payload.json"
    args = ["bench", "payload", "--runs", "2", "--trials", "5", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| rse1" in printed and "| protobuf" in printed
    assert json.loads(out.read_text())["config"]["rank"] == 8
