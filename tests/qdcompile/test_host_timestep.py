"""The quantized sampler never reads the time step back from the device: it follows a host copy
of the scheduler's schedule (Fast path 1: no host sync in a step, CUDA-graph friendly)."""

from types import SimpleNamespace

import pytest
import torch

from qdcompile.pipeline import QuantizedUNet


def _sampler_state():
    ns = SimpleNamespace(_schedule=None, _cursor=0, _mismatch=None, _warned_sync=False)
    for name in ("follow_schedule", "advance_schedule", "check_schedule", "host_timestep"):
        setattr(ns, name, getattr(QuantizedUNet, name).__get__(ns))
    return ns


def test_device_time_steps_come_from_the_host_schedule_without_a_read():
    q = _sampler_state()
    schedule = torch.randperm(1000)[:7].sort(descending=True).values
    q.follow_schedule(schedule)
    for i, t in enumerate(schedule.tolist()):
        # a meta tensor has no data: reading it would raise, so a returned value proves no read
        dev_t = torch.empty((2,), dtype=torch.long, device="meta")
        assert q.host_timestep(dev_t) == t
        q.advance_schedule()
    # Python numbers and CPU tensors are read directly
    assert q.host_timestep(17) == 17 and q.host_timestep(torch.tensor([33, 33])) == 33


def test_a_call_off_the_schedule_is_reported_at_the_check(monkeypatch):
    import qdcompile.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_host_readable", lambda t: False)   # CPU tensors stand in for CUDA ones
    q = _sampler_state()
    q.follow_schedule(torch.tensor([900, 500, 100]))
    for t in (900, 500):
        assert q.host_timestep(torch.tensor([t, t])) == t
        q.advance_schedule()
    q.check_schedule()                                   # all calls were on the schedule
    assert q.host_timestep(torch.tensor([101, 101])) == 100   # the schedule's value is used...
    with pytest.raises(RuntimeError, match="not the scheduler's current ones"):
        q.check_schedule()                               # ...and the device comparison reports the call
    q.check_schedule()                                   # the flag is consumed by the check
