"""evaluate.py's one front end (offload/evaluate_cli.py): a flag both modes take means the same in both,
the engine refuses a list where it runs one value, a flag of the other mode is refused, and every
refusal is one line before any model loads or any configuration runs (nothing here loads a model)."""

from __future__ import annotations

import pytest

from core.errors import run_cli
from data_pipeline.trace_store import ModelInfo
from evaluate import main
from offload.capacity import Capacity, parse_capacity
from offload.evaluate_cli import EngineArgs, SweepArgs, parse_args

ENGINE = ["--prefetch", "gate", "--no-wandb"]  # the engine's default (learned) would need a trained predictor
INFO = ModelInfo("m", "olmoe", 16, 64, 4, expert_bytes=12 * 2**20)  # 48MiB = 4 slots = top-k


def sim(*argv: str) -> SweepArgs:
    args = parse_args(["--trace", "traces/none", *argv])  # the checks never open the store
    assert isinstance(args, SweepArgs)
    return args


def engine(*argv: str) -> EngineArgs:
    args = parse_args([*ENGINE, *argv])
    assert isinstance(args, EngineArgs)
    return args


@pytest.fixture
def nothing_runs(monkeypatch):
    """A refusal must come before any model loads or any configuration runs."""
    monkeypatch.setattr("offload.engine.cli.run", lambda args: pytest.fail("the engine ran"))
    monkeypatch.setattr("offload.sweep.run", lambda args: pytest.fail("the sweep ran"))
    monkeypatch.setattr("data_pipeline.models.load_model", lambda *a, **k: pytest.fail("a model loaded"))


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("text", ["5%", "12", "48MiB", "0.6GB"])
def test_capacity_means_the_same_in_both_modes(text):
    from offload.sweep import build_configs

    (in_sim,) = sim("--capacity", text).capacity
    in_engine = engine("--capacity", text).capacity
    assert in_sim == in_engine == Capacity.parse(text)
    # the engine resolves its slots on the loaded model; the simulator resolves each configuration's text
    (config,) = build_configs(sim("--capacity", text, "--policy", "lru"))
    assert config.capacity == text
    assert in_engine.slots(INFO) == parse_capacity(config.capacity, INFO) == in_sim.slots(INFO)


@pytest.mark.parametrize("flag,value,expected", [
    ("--policy", "least_stale", "least_stale"),
    ("--policy", "lhu", "lhu"),
    ("--lookahead", "2", 2),
    ("--hardware", "a100-5gbs:link_gbps=10,tflops=60", "a100-5gbs:link_gbps=10,tflops=60"),
    ("--admission", "greedy", "greedy"),
    ("--routing", "cache-aware", "cache-aware"),
    ("--prefetch", "topk", "topk"),
])
def test_a_shared_flag_is_one_value_in_the_engine_and_a_one_item_list_in_the_sweep(flag, value, expected):
    attr = flag[2:]
    assert getattr(engine(flag, value), attr) == expected
    assert getattr(sim(flag, value), attr) == [expected]


def test_lists_the_engine_runs_row_by_row_and_values_both_modes_share():
    assert engine("--miss", "fetch,drop,fetch").miss == sim("--miss", "fetch,drop").miss == ["fetch", "drop"]
    assert engine("--precisions", "int4").precisions == sim("--precisions", "int4").precisions == ("native", "int4")
    for text, size, dtype in (("olmoe-1b-7b", 3 * 2048 * 1024 * 2, "bfloat16"), ("12.6MB", 12_600_000, None),
                              ("1e6", 1_000_000, None), ("model", None, None)):
        for flag in ("--expert-bytes", "--copy-bytes"):  # one flag, two names
            e, s = engine(flag, text), sim(flag, text)
            assert (e.copy_bytes, e.copy_dtype) == (s.copy_bytes, s.copy_dtype) == (size, dtype), (flag, text)
    # the defaults differ (the engine's are the demo's), the meaning does not
    assert (engine().admission, sim().admission) == ("value", ["greedy"])
    assert (engine().lookahead, sim().lookahead) == (None, [1])  # engine: the predictor's


def test_a_learned_predictor_is_named_the_same_way_in_both_modes(tmp_path):
    ckpt = tmp_path / "mlp_lookahead.safetensors"
    ckpt.write_bytes(b"")  # only resolved here, never loaded
    assert sim("--prefetch", "learned", "--checkpoint", str(ckpt)).prefetch == [f"ckpt:{ckpt}"]
    assert sim("--prefetch", f"ckpt:{ckpt}").prefetch == [f"ckpt:{ckpt}"]
    for argv in (["--prefetch", "learned", "--checkpoint", str(ckpt)], ["--prefetch", f"ckpt:{ckpt}"]):
        args = parse_args(["--no-wandb", *argv])
        assert (args.prefetch, args.checkpoint_file) == ("learned", ckpt)


@pytest.mark.parametrize("flag,value", [
    ("--policy", "lru,least_stale"), ("--policy", "all"), ("--capacity", "5%,10%"), ("--lookahead", "1,2"),
    ("--hardware", "a100-5gbs,pcie4"), ("--admission", "value,greedy"), ("--routing", "standard,cache-aware"),
    ("--prefetch", "gate,none"),
])
def test_a_list_where_the_engine_takes_one_value_is_refused_in_one_line(capsys, nothing_runs, flag, value):
    line = refused(capsys, [*ENGINE, flag, value])
    assert f"{flag} takes one value" in line and "simulation mode (--trace" in line, line
    assert len(getattr(sim(flag, value), flag[2:])) > 1  # what the sweep takes as a sweep


@pytest.mark.parametrize("value,needle", [
    ("nan", "finite"), ("", "--capacity is empty"), ("150%", "more than every expert"), ("0", "positive"),
    ("1.5", "whole number"), ("1.2.3GB", "not a size"),
])
def test_a_bad_capacity_is_the_same_line_in_both_modes(capsys, nothing_runs, value, needle):
    in_engine = refused(capsys, [*ENGINE, "--capacity", value])
    in_sim = refused(capsys, ["--trace", "traces/none", "--capacity", value])
    assert in_engine == in_sim and needle in in_engine, (in_engine, in_sim)


@pytest.mark.parametrize("argv,needle", [
    (["--policy", "nope"], "valid: least_stale"),
    (["--lookahead", "0"], "at least 1"),
    (["--lookahead", "two"], "whole numbers"),
    (["--miss", "fetch-highest-bit"], "unknown miss handling"),
    (["--routing", "nope"], "unknown routing"),
    (["--admission", "nope"], "unknown prefetch admission"),
    (["--hardware", "nope"], "valid: a100-5gbs"),
    (["--precisions", "int3"], "unknown precision 'int3'"),
    (["--copy-bytes", "abc"], "neither a size"),
])
def test_other_shared_refusals_are_the_same_line_in_both_modes(capsys, nothing_runs, argv, needle):
    in_engine = refused(capsys, [*ENGINE, *argv])
    in_sim = refused(capsys, ["--trace", "traces/none", *argv])
    assert in_engine == in_sim and needle in in_engine, (in_engine, in_sim)


@pytest.mark.parametrize("argv,needle", [
    ([*ENGINE, "--workers", "2"], "--workers is a flag of simulation mode"),
    ([*ENGINE, "--phase", "decode"], "--phase is a flag of simulation mode"),
    (["--trace", "traces/none", "--bandwidth", "5GB/s"], "--bandwidth is a flag of engine mode"),
    (["--trace", "traces/none", "--model", "tiny-olmoe"], "the model is the trace store's"),
    (["--trace", "traces/none", "--no-wandb"], "--wandb/--no-wandb is a flag of engine mode"),
    (["--trace", "traces/none", "--hardware", "calibrated"], "engine mode's"),
    ([*ENGINE, "--mode", "sim"], "simulation mode needs --trace"),
    (["--mode", "engine", "--trace", "traces/none"], "--trace selects simulation mode"),
    (["--trace", ""], "--trace is empty"),
    (["--prefetch", "oracle"], "only the simulator runs it"),
    (["--prefetch", "topk", "--lookahead", "2"], "next layer only"),
    (["--trace", "traces/none", "--prefetch", "percentile", "--lookahead", "1,3"], "next layer only"),
    (["--system", "zhu", "--lookahead", "2"], "next layer only"),  # the system's prefetcher
])
def test_mode_mismatches_are_one_line(capsys, nothing_runs, argv, needle):
    assert needle in refused(capsys, argv)
