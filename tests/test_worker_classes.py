"""The pool's rules without servers: capacity parsing, worker classes, dominance, and matching an estimate
(divmerge_service.workers)."""

from __future__ import annotations

import pytest

from divmerge_service import workers as W

GiB = W.GiB


def _estimate(device_gib: float, host_gib: float = 1.0, placement: str = "auto") -> dict:
    need = {"device": int(device_gib * GiB), "host": int(host_gib * GiB)}
    cpu = {"device": 0, "host": int((device_gib + host_gib) * GiB)}
    return {
        "placement": placement,
        "order": ["resident", "offload", "stream"],
        "headroom": 0.9,
        "needs": {
            "cuda": dict.fromkeys(("resident", "offload", "stream"), need),
            "cpu": dict.fromkeys(("resident", "offload", "stream"), cpu),
        },
    }


def _cap(text: str, host: str = "64GiB") -> W.Capacity:
    return W.capacity_of(W.parse_devices(text), W.parse_host(host)[0])


def test_parse_devices_and_host():
    devs = W.parse_devices("cuda:80GiB, cuda:80GiB/70GiB")
    assert [(d["kind"], d["total"], d["free"]) for d in devs] == [
        ("cuda", 80 * GiB, 80 * GiB),
        ("cuda", 80 * GiB, 70 * GiB),
    ]
    assert W.parse_devices('[{"kind": "cuda", "total": "24GiB", "free": "20GiB"}]')[0]["free"] == 20 * GiB
    assert W.parse_host("256GiB/200GiB") == (256 * GiB, 200 * GiB)
    assert W.parse_bytes("24GB") == 24 * 10**9
    for bad in ("gpu:80GiB", "cuda", "cuda:eighty", "cuda:10GiB/20GiB", "", "[1]"):
        with pytest.raises(W.CapacityError):
            W.parse_devices(bad)


def test_classes_and_dominance():
    assert W.class_of(_cap("cuda:80GiB")) == "gpu-80g"
    assert W.class_of(_cap("cuda:80GiB,cuda:80GiB")) == "gpu-80g-x2"
    assert W.class_of(_cap("cpu:64GiB")) == "cpu-64g"
    assert W.class_of(_cap("cuda:512MiB")) == "gpu-512m"
    big, small, two = _cap("cuda:80GiB"), _cap("cuda:24GiB"), _cap("cuda:80GiB,cuda:80GiB")
    assert big.dominates(small) and not small.dominates(big)
    assert two.dominates(big) and not big.dominates(two)
    assert not big.dominates(_cap("cpu:1GiB", host="1GiB"))  # another kind
    pool = {"gpu-24g": small, "gpu-80g-x2": two}
    assert W.consumed_classes(big, pool) == ["gpu-80g", "gpu-24g"]


def test_route_picks_the_smallest_fitting_class_and_refuses_when_none_fits():
    pool = {"gpu-24g": _cap("cuda:24GiB"), "gpu-80g": _cap("cuda:80GiB"), "cpu-64g": _cap("cpu:64GiB")}
    assert W.route(_estimate(10), pool) == W.Route("gpu-24g", "resident")
    assert W.route(_estimate(30), pool) == W.Route("gpu-80g", "resident")
    refusal = W.route(_estimate(100), pool)
    assert isinstance(refusal, W.Refusal) and refusal.field == "parameters"
    assert "100.0 GiB of CUDA memory" in refusal.message and "gpu-80g" in refusal.message
    # host memory counts too: 70 GiB of host fits no GPU worker's 64 GiB
    assert isinstance(W.route(_estimate(1, host_gib=70), pool), W.Refusal)
    # only the CPU class fits a job whose device need no GPU holds but whose host need the CPU worker does
    assert W.route(
        _estimate(30, host_gib=1), {"gpu-24g": _cap("cuda:24GiB"), "cpu-64g": _cap("cpu:64GiB")}
    ) == W.Route("cpu-64g", "resident")


def test_devices_per_job_needs_that_many_devices():
    pool = {"gpu-80g": _cap("cuda:80GiB"), "gpu-24g-x2": _cap("cuda:24GiB,cuda:24GiB")}
    assert W.route(_estimate(10), pool, devices_per_job=2) == W.Route("gpu-24g-x2", "resident")
    refusal = W.route(_estimate(10), pool, devices_per_job=4)
    assert isinstance(refusal, W.Refusal) and refusal.field == "devices_per_job"
    # at claim: free memory per device; one full device leaves one free, not two
    here = W.capacity_of(W.parse_devices("cuda:24GiB/1GiB,cuda:24GiB"), 64 * GiB, free=True)
    assert W.placement_for(_estimate(10), here, 1) == "resident"
    assert W.placement_for(_estimate(10), here, 2) is None


def test_a_fixed_placement_is_the_only_one_tried():
    est = _estimate(10, placement="stream")
    est["needs"]["cuda"] = {**est["needs"]["cuda"], "stream": {"device": 30 * GiB, "host": GiB}}
    assert W.placement_for(est, _cap("cuda:24GiB"), 1) is None
    assert W.placement_for(est, _cap("cuda:80GiB"), 1) == "stream"
