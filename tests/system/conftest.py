import pytest

from tests.system.harness import GatewayUnderTest

DEMO_SENSORS = [
    {"id": "imu0", "kind": "imu", "rate_hz": 100, "seed": 1, "batch_max_age_s": 0.05},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
    {"id": "engine0", "kind": "engine", "rate_hz": 20, "seed": 3, "batch_max_age_s": 0.05},
]


@pytest.fixture
def make_gateway(tmp_path):
    started: list[GatewayUnderTest] = []

    def make(sensors=None, subdir="gw", **sections) -> GatewayUnderTest:
        path = tmp_path / subdir
        path.mkdir(exist_ok=True)
        gw = GatewayUnderTest(path, DEMO_SENSORS if sensors is None else sensors, **sections)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session", autouse=True)
def no_gateway_process_is_left_behind(tmp_path_factory):
    """After the whole session, no gateway or actor process of these tests may remain."""
    ours = str(tmp_path_factory.getbasetemp())
    yield
    import psutil

    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        # Only this session's gateways (their configs live under pytest's temporary
        # directories): a benchmark or a real gateway on the same machine is not ours.
        if ("tools.cli run" in cmd and ours in cmd
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            leftovers.append((proc.info["pid"], cmd[:100]))
            proc.kill()
    assert not leftovers, f"gateway processes left running: {leftovers}"
