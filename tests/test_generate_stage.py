"""The Generate stage's machinery without Ray: the engine thread, the gate, failures and rows."""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pytest
import torch

from cogvlm.engine import Engine, Request
from pipeline import load_config
from pipeline.crashes import Gate
from pipeline.engine_loop import EngineLoop

from .data import webdataset_shards
from .test_pipeline import job


@pytest.fixture(scope="module")
def loop_v1(model_v1):
    return EngineLoop(Engine(model_v1, max_prompt_tokens=16, max_new_tokens=8, max_slots=8))


def _image(model, seed: int, size: int | None = None) -> torch.Tensor:
    S = size or model.config.image_size
    return torch.randn(3, S, S, generator=torch.Generator().manual_seed(seed))


def test_a_failing_round_fails_its_callers_and_the_engine_goes_on(loop_v1, model_v1):
    """An image of the wrong size breaks the vision pass of the round it is in: every image of
    that round learns it, the thread survives, and each image then runs alone."""
    good = [Request([5, 6, 7], 0, 4, ignore_eos=True)]

    async def together():
        return await asyncio.gather(loop_v1.generate(good, _image(model_v1, 1)),
                                    loop_v1.generate(good, _image(model_v1, 2, size=70)), return_exceptions=True)

    a, b = asyncio.run(together())
    assert isinstance(a, RuntimeError) and isinstance(b, RuntimeError)
    assert loop_v1.thread.is_alive() and loop_v1.broken is None
    alone = asyncio.run(loop_v1.generate(good, _image(model_v1, 1)))
    assert len(alone) == 1 and len(alone[0].tokens) == 4
    with pytest.raises(RuntimeError):
        asyncio.run(loop_v1.generate(good, _image(model_v1, 2, size=70)))


def test_a_caller_that_gave_up_does_not_stop_the_engine(loop_v1, model_v1):
    """The first caller times out and its event loop closes before its image finishes; the
    engine thread must not die delivering that result, and later callers get theirs."""
    long = [Request(list(range(5, 20)), 0, 8, ignore_eos=True) for _ in range(6)]

    async def impatient():
        await asyncio.wait_for(loop_v1.generate(long, _image(model_v1, 3)), timeout=0.001)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(impatient())
    out = asyncio.run(loop_v1.generate([Request([9, 10], 0, 3, ignore_eos=True)], _image(model_v1, 4)))
    assert len(out[0].tokens) == 3 and loop_v1.thread.is_alive()
    assert asyncio.run(loop_v1.generate([], _image(model_v1, 4))) == []


def test_gate_exclusive_waits_for_shared_and_survives_cancellation():
    async def main():
        gate, order = Gate(), []

        async def shared(name, hold):
            async with gate.shared():
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        async def exclusive():
            async with gate.exclusive():
                order.append("X")

        a = asyncio.create_task(shared("a", 0.05))
        await asyncio.sleep(0.01)
        x = asyncio.create_task(exclusive())
        await asyncio.sleep(0.01)
        b = asyncio.create_task(shared("b", 0))  # arrives while X waits: goes after X
        await asyncio.gather(a, x, b)
        assert order == ["a+", "a-", "X", "b+", "b-"]
        # an exclusive waiter that is cancelled does not block later batches
        c = asyncio.create_task(shared("c", 0.05))
        await asyncio.sleep(0.01)
        y = asyncio.create_task(exclusive())
        await asyncio.sleep(0.01)
        y.cancel()
        await asyncio.wait_for(shared("d", 0), timeout=2)
        await c

    asyncio.run(main())
    asyncio.run(main())  # a second event loop: the gate rebinds to it


def test_generate_stage_rows_exactly_once_when_an_image_fails(ckpt_v1, tokenizer_v1, tmp_path):
    """An image whose pixels are broken fails among others; it is retried alone and fails alone
    (its own generation_error rows), the others succeed, and its prompt that was too long is
    reported once, not again after the retry."""
    from cogvlm.weights import read_config
    from pipeline.listing import Shard
    from pipeline.readers import read_shard
    from pipeline.stages import Generate, Preprocess

    webdataset_shards(tmp_path / "in", n_shards=1, per_shard=3)
    long_question = " ".join(["what"] * 80) + "?"
    tasks = {"caption": {"max_new_tokens": 6}, "vqa": {"questions": [long_question], "max_new_tokens": 4}}
    cfg = load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", tmp_path / "o", tasks=tasks,
                               model={"max_prompt_tokens": 48}))
    mcfg = read_config(ckpt_v1)
    rows = pd.DataFrame(read_shard(Shard("00000", str(tmp_path / "in" / "00000.tar")), cfg.input, cfg.s3))
    pre = Preprocess.__call__(Preprocess(cfg, mcfg), rows)
    pre.loc[1, ["pixels", "pixels_format"]] = [b"\0" * 7, "raw"]  # not an (S, S, 3) image
    out = Generate(cfg, mcfg).run(pre)
    assert len(out) == 6 and not out.duplicated(["key", "task_index"]).any()
    by = out.set_index(["key", "task_index"]).status
    bad = pre.key[1]
    assert by[(bad, 0)] == "generation_error" and by[(bad, 1)] == "prompt_too_long"
    assert "max_prompt_tokens" in out.set_index(["key", "task_index"]).error_message[(bad, 1)]
    for k in (pre.key[0], pre.key[2]):
        assert by[(k, 0)] == "ok" and by[(k, 1)] == "prompt_too_long"
    assert json.loads(out.generation_settings.iloc[0])["max_new_tokens"] in (4, 6)
