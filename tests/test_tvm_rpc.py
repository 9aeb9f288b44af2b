"""TVM RPC boards: real rpc_tracker / rpc_server processes on 127.0.0.1 (x86 code, this machine's CPU) stand in
for a board. Each failure has its own message and exit code: nothing listening, a tracker without the key,
a handshake that never completes, a busy board, a session timeout, a board that dies mid-run."""

import json
import socket

import pytest

from squeeze.target import load_target

pytest.importorskip("tvm", reason="the tvm extra is not installed (pip install 'squeeze[tvm]')")

from squeeze.measure import tvm as mt  # noqa: E402
from squeeze.measure.protocol import Protocol  # noqa: E402

KEY = "x86-test"


def board_target(tmp_path, rpc: str, name: str = "x86-board", tuning: str = "none"):
    """This CPU's code, run over RPC: the board path without an ARM board."""
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nruntime: tvm\nthreads: 1\ntvm:\n  target: detect\n  runner: rpc\n"
                 f"  rpc: {{{rpc}}}\n  tuning: {tuning}\n")
    return load_target(str(p))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_board_env(monkeypatch):
    for k in ("SQUEEZE_RPC_HOST", "SQUEEZE_RPC_PORT", "SQUEEZE_RPC_TRACKER", "SQUEEZE_RPC_KEY", "SQUEEZE_RPC_EMULATED"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def tracker():
    """A real rpc_tracker with one rpc_server registered under KEY (about 10 s to start on 2 loaded cores)."""
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    port = free_port()
    trk = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    server_port = free_port()
    srv = Server(host="127.0.0.1", port=server_port, port_end=server_port + 1, tracker_addr=("127.0.0.1", trk.port),
                 key=KEY, silent=True)
    for _ in range(100):  # until the server has registered
        if rpc.connect_tracker("127.0.0.1", trk.port).summary()["queue_info"].get(KEY, {}).get("free"):
            break
        import time

        time.sleep(0.2)
    yield f"127.0.0.1:{trk.port}"
    srv.terminate()
    trk.terminate()


@pytest.fixture(scope="module")
def tiny():
    import testnets
    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import LoadedModel

    return export_onnx(LoadedModel("tiny", "factory", (1, 3, 16, 16), testnets.tiny_cnn()), exporter="torchscript")


def test_nothing_listening(cli, tmp_path, fast):
    port = free_port()
    t = board_target(tmp_path, f"host: 127.0.0.1, port: {port}, retries: 1")
    with pytest.raises(mt.NothingListening, match=rf"Nothing listening at 127.0.0.1:{port} .*rpc_server --host"):
        mt.connect(t)
    r = cli("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--target", "arm-a72", "--rpc",
            f"127.0.0.1:{port}", *fast)
    assert r.exit_code == 2 and f"Nothing listening at 127.0.0.1:{port}" in r.stderr
    r = cli("targets", "check", "arm-a72", "--tracker", f"127.0.0.1:{port}", "--key", "rpi4")
    assert r.exit_code == 1 and f"FAIL at `connect`: Nothing listening at 127.0.0.1:{port} (rpc_tracker" in r.stderr


def test_handshake_timeout(tmp_path):
    """A port that accepts connections but never speaks TVM RPC (a busy server, another program)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        t = board_target(tmp_path, f"host: 127.0.0.1, port: {port}, connect_timeout_s: 0.5, retries: 1")
        with pytest.raises(mt.BoardTimeout, match=r"accepted the connection but did not complete the TVM RPC "
                                                  r"handshake within 0.5 s"):
            mt.connect(t)
        t = board_target(tmp_path, f"tracker: '127.0.0.1:{port}', key: k, connect_timeout_s: 0.5, retries: 0")
        with pytest.raises(mt.BoardTimeout, match=r"did not answer as a TVM rpc_tracker within 0.5 s"):
            mt.connect(t)


def test_wrong_key_with_a_real_tracker(cli, tracker, tmp_path):
    t = board_target(tmp_path, f"tracker: '{tracker}', key: rpi4, retries: 2")
    with pytest.raises(mt.BoardError, match=rf"tracker at {tracker} has no free device with key `rpi4` "
                                            rf"\(keys it knows: {KEY} \(1 free\)\)"):
        mt.connect(t)
    r = cli("targets", "check", "arm-a72", "--tracker", tracker, "--key", "rpi4")
    assert r.exit_code == 1
    assert f"FAIL at `connect`: The tracker at {tracker} has no free device with key `rpi4`" in r.stderr
    assert f"rpc_server --tracker {tracker} --key rpi4" in " ".join(r.stderr.split())


def test_busy_board_through_the_tracker(tracker, tmp_path):
    t = board_target(tmp_path, f"tracker: '{tracker}', key: {KEY}, connect_timeout_s: 1, retries: 0")
    held = mt.connect(t)  # the only board with this key is now in use
    with pytest.raises(mt.BoardTimeout, match=rf"no free device with key `{KEY}`: 1 registered, all busy for 1 s"):
        mt.connect(t)
    del held


def test_check_through_the_tracker(cli, tracker, tmp_path):
    t = board_target(tmp_path, f"tracker: '{tracker}', key: {KEY}")
    r = cli("targets", "check", t.source, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    steps = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
    assert steps["connect"]["status"] == "pass" and f"key {KEY}" in steps["connect"]["detail"]
    # The one board behind the key, busy with the check's own session.
    assert steps["boards"]["detail"].startswith(f"1 board(s) under key `{KEY}` (127.0.0.1:")
    assert "0 free, 1 busy" in steps["boards"]["detail"]
    assert float(steps["numerics vs ORT"]["detail"].split()[3]) < 1e-4
    assert f"via RPC (tracker {tracker}, key {KEY})" in steps["latency"]["detail"]
    assert "labelled: untuned" in steps["latency"]["detail"]


@pytest.fixture
def direct_server():
    from tvm.rpc.server import Server

    port = free_port()
    srv = Server(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    yield srv
    srv.terminate()


def _kill_sessions(server) -> None:
    """Kill the server's session processes, as a board losing power would."""
    import psutil

    for child in psutil.Process(server.proc._proc.pid).children(recursive=True):
        child.kill()


def test_device_dropped_mid_run_keeps_partial_results(direct_server, tmp_path, tiny):
    t = board_target(tmp_path, f"host: 127.0.0.1, port: {direct_server.port}")
    runtime = mt.TvmRuntime()
    session = runtime.open(tiny, t, Protocol.for_target(t, repeat=3, warmup=1, min_repeat_ms=1))
    first = session.sample(2)
    _kill_sessions(direct_server)
    with pytest.raises(mt.DeviceDropped, match=rf"device at 127.0.0.1:{direct_server.port} dropped mid-run .*"
                                               r"partial results kept \(1 samples\) in (\S+)\.") as info:
        session.sample(2)
    path = info.value.what.split(" in ")[-1].rstrip(".")
    kept = json.loads(open(path).read())
    assert kept["models"][0]["artifact_sha256"] == tiny.sha256
    assert kept["models"][0]["samples"] == [{"calls": 2, "ms": first}]


def test_session_timeout_is_reported(direct_server, tmp_path, tiny):
    import time

    t = board_target(tmp_path, f"host: 127.0.0.1, port: {direct_server.port}, session_timeout_s: 2")
    # On a loaded machine the session may already end while the model is being opened: the same error then.
    with pytest.raises(mt.BoardTimeout, match=r"session on 127.0.0.1:\d+ timed out after 2 s.*partial results kept"):
        session = mt.TvmRuntime().open(tiny, t, Protocol.for_target(t, repeat=3, warmup=1, min_repeat_ms=1))
        time.sleep(3)
        session.sample(2)


@pytest.mark.slow
def test_tuning_times_candidates_on_the_board(direct_server, tmp_path, monkeypatch):
    """MetaSchedule over RPC without a tracker: candidates built here, timed by the board's server."""
    from torch import nn

    from squeeze.export.onnx import export_onnx
    from squeeze.export.tvm import build_library
    from squeeze.export.tvm import resolve_target
    from squeeze.export.tuning import TuningDatabase
    from squeeze.model.loading import LoadedModel

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    art = export_onnx(LoadedModel("one-conv", "factory", (1, 3, 8, 8), net), exporter="torchscript")
    t = board_target(tmp_path, f"host: 127.0.0.1, port: {direct_server.port}",
                     tuning="metaschedule\n  tuning_trials: 2")
    lib = build_library(art, t)
    assert lib.tuning["tuned_now"] == ["fused_conv2d_add_relu"]
    records = TuningDatabase(resolve_target(t)).db.get_all_tuning_records()
    assert records and all(r.run_secs and float(r.run_secs[0]) > 0 for r in records)


# --- a fleet: several boards behind one key ------------------------------------------------------------------


def test_batches_go_to_the_boards_left_when_one_drops():
    """The scheduling alone: a board that drops mid-batch has its batch queued again; other errors stop."""
    import threading

    from squeeze.measure.fleet import run_batches

    dropped, lock, done = [], threading.Lock(), []

    def run(batch):
        with lock:
            first = batch == "b" and not dropped
            dropped.append(batch) if first else None
        if first:
            raise mt.DeviceDropped("The device at 127.0.0.1:9 dropped mid-run.", "Check the board.")
        return batch.upper()

    assert run_batches(["a", "b", "c"], run, 2, done.append) == ["A", "B", "C"]
    assert dropped == ["b"] and sorted(done) == ["a", "b", "c"]
    with pytest.raises(mt.DeviceDropped, match="failed 3 times, on whichever boards were left"):
        run_batches(["a"], lambda b: (_ for _ in ()).throw(mt.DeviceDropped("Gone.", "")), 2, done.append)
    with pytest.raises(ValueError):  # not a board's failure: no second try
        run_batches(["a", "b"], lambda b: (_ for _ in ()).throw(ValueError(b)), 2, done.append)


@pytest.fixture
def two_boards():
    """A tracker with two rpc_servers under one key (this CPU's code), each in a process of its own."""
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    port = free_port()
    trk = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    servers = []
    for _ in range(2):
        p = free_port()
        servers.append(Server(host="127.0.0.1", port=p, port_end=p + 1, tracker_addr=("127.0.0.1", trk.port),
                              key="fleet", silent=True))
    import time

    for _ in range(150):
        if rpc.connect_tracker("127.0.0.1", trk.port).summary()["queue_info"].get("fleet", {}).get("free") == 2:
            break
        time.sleep(0.2)
    yield f"127.0.0.1:{trk.port}", servers
    for srv in servers:
        srv.terminate()
    trk.terminate()


@pytest.mark.slow
def test_a_lookup_table_build_uses_both_boards_and_survives_one_dying(two_boards, tmp_path, monkeypatch):
    import threading

    from squeeze.measure import fleet as fleet_mod
    from squeeze.measure.lut import LatencyTable, LayerConfig

    tracker, servers = two_boards
    t = board_target(tmp_path, f"tracker: '{tracker}', key: fleet")
    found = mt.fleet(t.tvm.rpc)
    assert len(found.boards) == 2 and found.free == 2 and "2 board(s) under key `fleet`" in found.describe()
    assert mt.TvmRuntime().devices(t) == 2
    monkeypatch.setattr("squeeze.measure.lut._BATCH", 2)  # three batches of two layers
    cfgs = [LayerConfig("conv2d", 8, c, 8, 8, (3, 3), (1, 1), (1, 1), 1) for c in (8, 16, 24, 32, 40, 48)]
    at_once, running, lock = [], [0], threading.Lock()
    real = fleet_mod.run_batches

    def watched(batches, run, slots, done, attempts=3):
        def counted(batch):
            with lock:
                running[0] += 1
                at_once.append(running[0])
            try:
                if len(at_once) == 2:  # both boards are busy: one of them dies under its batch
                    servers[1].terminate()
                return run(batch)
            finally:
                with lock:
                    running[0] -= 1

        return real(batches, counted, slots, done, attempts)

    monkeypatch.setattr(fleet_mod, "run_batches", watched)
    table = LatencyTable(t, Protocol.for_target(t, repeat=3, warmup=1, min_repeat_ms=1))
    entries = table.entries(cfgs)
    assert set(entries) == {c.key for c in cfgs} and all(e.median_ms > 0 for e in entries.values())
    assert max(at_once) == 2  # two batches ran at the same time, one per board
    assert len(mt.fleet(t.tvm.rpc).boards) == 1  # the dead board left the tracker; its batch ran on the other
