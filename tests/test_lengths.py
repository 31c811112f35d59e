"""The length report (issue 28, item 7): token lengths per dataset under the run's template,
tokenizer and tiling, and what data.max_length drops or cuts, checked against tokens counted
here from the shards' raw bytes and against the loader's own skip counters."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_mpo.config import from_dict
from megatron_mpo.errors import UserError
from tests.conftest import base_config, run_tool, write_config


def _cfg(ws: Path, **data):
    return from_dict(base_config(ws, data=data)).validate()


def _context(cfg):
    from megatron_mpo.training import data_setup, model_setup

    model_config = model_setup.model_config(cfg)
    return model_config, data_setup.tokenizer(cfg)


def _report(cfg, samples=1000):
    from megatron_mpo.training.length_check import run_lengths

    return run_lengths(cfg, *_context(cfg), samples)


def _raw_samples(shards: Path) -> list[dict]:
    """Every sample of the shards, read with tarfile here: {"json": ..., member suffix: bytes}."""
    out = []
    for entry in json.loads((shards / "index.json").read_text())["shards"]:
        samples: dict = {}
        with tarfile.open(shards / entry["name"]) as tar:
            for info in tar.getmembers():
                key, _, suffix = info.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
        out += list(samples.values())
    return out


def _counted_here(ws: Path, cfg) -> dict:
    """{dataset: {measure: [tokens per pair]}}: the prompt text with its image tokens spelled
    out (tiles from the decoded images), tokenised whole; each response with its end of turn."""
    from megatron_mpo.data.templates import expand_image_placeholders, get_template
    from megatron_mpo.data.tiling import dynamic_preprocess
    from megatron_mpo.training.data_setup import run_template

    model_config, tok = _context(cfg)
    template = get_template(run_template(cfg, model_config)[0])
    size, per_tile = model_config.vision.image_size, model_config.tokens_per_tile
    found: dict = defaultdict(lambda: defaultdict(list))
    for raw in _raw_samples(ws / "shards"):
        meta = json.loads(raw["json"])
        images = [Image.open(io.BytesIO(raw[name])).convert("RGB") for name in meta["images"]]
        budget = max(1, cfg.data.max_tiles // max(1, len(images)))  # InternVL: max_num // images
        tiles = [len(dynamic_preprocess(img, size, budget)) for img in images]
        question = meta["question"] if "<image>" in meta["question"] else "<image>\n" * len(images) + meta["question"]
        text = expand_image_placeholders(template.render_prompt(question), tiles, per_tile)
        prompt = len(tok.encode(text)) + (1 if template.bos and tok.add_bos else 0)
        chosen, rejected = (len(tok.encode(meta[k] + "<|im_end|>")) for k in ("chosen", "rejected"))
        for group in (meta["dataset"], "all"):
            for measure, value in (("prompt", prompt), ("image", sum(tiles) * per_tile), ("chosen", chosen),
                                   ("rejected", rejected), ("whole", prompt + max(chosen, rejected))):
                found[group][measure].append(value)
    return found


def _expected_stats(values: list) -> dict:
    return {"p50": int(np.percentile(values, 50, method="inverted_cdf")),
            "p90": int(np.percentile(values, 90, method="inverted_cdf")),
            "p99": int(np.percentile(values, 99, method="inverted_cdf")), "max": max(values)}


def test_lengths_match_tokens_counted_from_the_raw_shards(workspace):
    cfg = _cfg(workspace, max_length=215)
    report = _report(cfg)
    here = _counted_here(workspace, cfg)
    assert (report.read, report.total, report.shards_read, report.shards) == (60, 60, 4, 4)
    assert sorted(report.groups) == ["shapes", "texts"]
    for name, measures in here.items():
        group = report.overall if name == "all" else report.groups[name]
        assert group.pairs == len(measures["prompt"])
        for measure, values in measures.items():
            assert group.stats(measure) == _expected_stats(values), (name, measure)
        # The rule at max_length 215, applied here to the counts above.
        room = [215 - p for p in measures["prompt"]]
        kept = [r for r in room if r >= 1]
        assert group.dropped == len(room) - len(kept)
        assert group.chosen_cut == sum(c > r >= 1 for c, r in zip(measures["chosen"], room))
        assert group.rejected_cut == sum(c > r >= 1 for c, r in zip(measures["rejected"], room))
    assert any(v > 0 for v in here["shapes"]["image"]) and set(here["texts"]["image"]) == {0}
    g = report.overall
    assert g.cut_share == (g.chosen_cut + g.rejected_cut) / 120 and g.dropped_share == g.dropped / 60


@pytest.mark.parametrize("max_length", [215, 230])
def test_shares_equal_the_loaders_own_counts(workspace, max_length):
    """The report's dropped and cut pairs are what the loader counts (prompt_too_long,
    response_truncated) reading the same shards at the same max_length."""
    from megatron_mpo.data import build_loader
    from megatron_mpo.training import data_setup

    cfg = _cfg(workspace, max_length=max_length)
    model_config, tok = _context(cfg)
    loader = build_loader(data_setup.loader_data(cfg, model_config, for_reference=True),
                          data_setup.loader_plan(cfg, model_config, for_reference=True), tok)
    kept = sum(b.num_pairs for b in loader)
    counts = loader.skip_counts
    g = _report(cfg).overall
    assert g.pairs == kept + counts.get("prompt_too_long", 0) == 60
    assert (g.dropped, g.pairs_cut) == (counts.get("prompt_too_long", 0), counts.get("response_truncated", 0))
    assert g.pairs_cut > 0 and g.dropped > 0


def test_a_sample_is_spread_over_the_shards_and_deterministic(workspace):
    from megatron_mpo.data.lengths import shard_quotas, spread_shards

    cfg = _cfg(workspace)
    first, second = _report(cfg, 20), _report(cfg, 20)
    assert (first.read, first.total, first.shards_read, first.shards) == (20, 60, 2, 4)
    assert {**first.to_json(), "seconds": 0} == {**second.to_json(), "seconds": 0}
    assert spread_shards(list("abcdefgh"), 40) == ["a", "c", "f"]  # 3 shards for 16 a shard at least: 8 * k // 3
    assert _report(cfg, 59).read == 59  # the short last shard (12 samples) is made up by the others
    assert shard_quotas([16, 16, 16, 12], 59) == [16, 16, 15, 12] and shard_quotas([None, 5, None], 20) == [8, 5, 7]


def test_the_tool_prints_tables_and_writes_json(workspace, tmp_path, capsys):
    from megatron_mpo.training.length_check import main

    config = write_config(tmp_path / "run.yaml", base_config(workspace))
    proc = run_tool("tools/data_lengths.py", "--config", str(config), "--json", str(tmp_path / "l.json"),
                    "data.max_length=215")
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["max_length"] == 215 and saved["read"] == 60 and set(saved["datasets"]) == {"shapes", "texts"}
    rows: dict = {}
    for line in proc.stdout.splitlines():  # the first table's rows
        rows.setdefault(line.split()[0] if line.strip() else "", line.split())
    shapes = saved["datasets"]["shapes"]
    assert rows["shapes"][1] == str(shapes["pairs"])
    assert rows["shapes"][2] == "/".join(str(shapes["prompt"][k]) for k in ("p50", "p90", "p99", "max"))
    assert "read 60 of 60 samples" in proc.stdout and "at data.max_length 215" in proc.stdout
    assert "warning: at data.max_length 215" in proc.stdout
    main(["--config", str(config), "--samples", "20"])  # max_length 512: every pair fits
    assert "warning" not in capsys.readouterr().out


def test_the_tool_says_what_is_missing(workspace, tmp_path):
    from megatron_mpo.training.length_check import main

    config = write_config(tmp_path / "run.yaml", base_config(workspace))
    with pytest.raises(UserError, match="set data.shards"):
        main(["--config", str(config), "data.shards="])
    with pytest.raises(UserError, match="--samples must be >= 1"):
        main(["--config", str(config), "--samples", "0"])


def test_samples_without_a_dataset_form_one_group_and_bad_ones_are_named(workspace, tmp_path):
    from megatron_mpo.data import build_loader, load_tokenizer
    from megatron_mpo.data.lengths import measure_lengths
    from tests.conftest import loader_settings

    members = {"a.json": {"question": "Hi?", "chosen": "Hello there.", "rejected": "Go."},
               "b.json": {"question": "Sum?", "chosen": "Two.", "rejected": "Three."}, "c.json": b"{not json"}
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        for name, body in members.items():
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = loader_settings(shards=str(tmp_path / "plain.tar"), template="internvl2_5", max_length=512,
                          image_size=56, tokens_per_tile=4, micro_batch=1, num_workers=0)
    report = measure_lengths(build_loader(*cfg, load_tokenizer(str(workspace / "tok"))), 100)
    assert list(report.groups) == ["(no dataset)"] and report.overall.pairs == 2 and report.total is None
    assert dict(report.overall.unusable) == {"bad_json": 1} and report.read == 3
    table = report.table()
    assert [line.split()[0] for line in table.splitlines() if line.startswith(("all", "(no"))] == ["all", "all"]
    assert "read 3 of an unknown number of samples" in table and table.endswith("skips them too): bad_json 1")
