"""The run's typed messages: every one survives msgpack both ways (distributed's rpc,
which gives lists back as tuples, and the data plane's frames), with no pickle."""

from __future__ import annotations

import msgpack
import pytest
import torch

from glinthawk_dask.runtime.messages import (
    AttendReply, AttendRequest, ForwardReply, ForwardRequest, Plan, Results, SliceSpec, StepLayout, StepMessage,
)
from glinthawk_dask.runtime.placement import make_plan
from glinthawk_dask.runtime.wire import decode, encode
from glinthawk_dask.sampling import SamplingParams


def _plan() -> Plan:
    return make_plan(mode="hybrid", dense=["tcp://d0", "tcp://d1"], attention={"tcp://a0": 10**9, "tcp://a1": 10**9},
                     n_layers=5, kv_bytes_per_token_layer=64, max_seq_len=40, micro_batch_size=3, n_micro_batches=3,
                     n_slices=2, local_micro_batches=1, local_batch_size=2)


def _step() -> StepMessage:
    return StepMessage(mb=1, step=7, slots=[3, 4], starts=[0, 12], counts=[5, 1], input_ids=[9, 8, 7, 6, 5, 4],
                       admitted=[["r1", 3, SamplingParams(max_tokens=4, temperature=0.5, seed=2).to_dict()]],
                       released=["r0"], sample_rows=[4, 5], sample=["r1", "r2"])


def _rpc_trip(d):
    """What distributed's rpc does to a message: msgpack, lists back as tuples."""
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False, use_list=False)


def _frame_trip(d):
    """What the data plane does to a message header."""
    meta, tensors = decode(bytearray(b"".join(bytes(b) for b in encode(dict(d)))[12:]),
                           len(msgpack.packb({**d, "t": []}, use_bin_type=True)))
    assert not tensors
    return meta


MESSAGES = [
    _plan(),
    _plan().grown(make_plan(mode="two-tier", dense=["tcp://d0", "tcp://d1"],
                            attention={"tcp://a1": 2 * 10**9, "tcp://a0": 10**9}, n_layers=5, kv_bytes_per_token_layer=64, max_seq_len=40, micro_batch_size=4,
                            n_micro_batches=2, n_slices=2), ["gh-1/g1s0", "gh-1/g1s1"]),
    SliceSpec.of_plan(_plan(), 1, run_id="gh-1", model="random:tiny", dtype="bfloat16", latency=0.01,
                      engine={"max_step_tokens": 64}),
    _step(),
    StepLayout(slots=[0, 1], starts=[0, 3], counts=[3, 1], admitted=[["r1", 0]], released=["r0", "r9"]),
    AttendRequest(run_id="gh-1/mb1-2", micro_batch=1, step=7, layer=2,
                  layout=StepLayout([0], [0], [1], [], []).to_wire()),
    AttendRequest(run_id="gh-1", micro_batch=0, step=3, layer=4),
    ForwardRequest(run_id="gh-1", msg=_step().to_wire()),
    ForwardReply(tokens=[1, 2, 3]),
    AttendReply(stale="run 'gh-1' is not open on tcp://a0"),
    Results(completions=[{"id": "r1", "prompt_token_ids": [1, 2], "completion_token_ids": [3],
                          "prompt": [{"role": "user", "content": "hi"}]}],
            moves=[{"kind": "moved micro-batch", "micro_batch": 1}],
            retired=[{"kind": "retired micro-batch", "micro_batch": 0, "closed": [{"cache": "gh-1", "slots": 4}]}],
            error=None, worker_failure=False,
            in_flight_tokens=0, n_submitted=3, n_done=1, n_steps=4, n_tokens=20, n_generated=5),
]


@pytest.mark.parametrize("trip", [_rpc_trip, _frame_trip], ids=["rpc", "frame"])
@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message, trip):
    wire = message.to_wire()
    back = type(message).from_wire(trip(wire))
    assert back == message
    assert back.to_wire() == wire  # lists again, not the tuples msgpack gave


def test_plan_reads_by_attribute():
    plan = Plan.from_wire(_rpc_trip(_plan().to_wire()))
    assert plan.slices == [[0, 2], [2, 5]] and plan.local == [True, False, False]
    assert plan.attention_workers() == ["tcp://a0", "tcp://a1"]
    assert plan.kv_bytes() == {"dense": sum(plan.dense_kv.values()),
                               "attention": 6 * 2 * 64 * 40 + 6 * 3 * 64 * 40}  # 2 x 3 slots on each slice


def test_slice_spec_of_a_plan():
    plan = _plan()
    first, last = (SliceSpec.of_plan(plan, s, run_id="r", model="m") for s in (0, 1))
    assert (first.start, first.stop, first.next_address) == (0, 2, "tcp://d1")
    assert (last.start, last.stop, last.next_address, last.slice_index) == (2, 5, None, 1)
    assert last.attention == plan.attention[1] and last.sizes == [2, 3, 3]


def test_attend_reply_carries_a_tensor_or_a_refusal():
    o = torch.ones(2, 3, 4)
    assert AttendReply(o=o).to_wire() == {"o": o}
    assert AttendReply.from_wire({"o": o}).o is o and AttendReply.from_wire({"o": o}).stale is None
    assert AttendReply(stale="gone").to_wire() == {"stale": "gone"}


def test_a_message_from_another_version_is_a_clear_error():
    wire = {**_step().to_wire(), "novel": 1}
    with pytest.raises(ValueError, match="same version"):
        StepMessage.from_wire(wire)
