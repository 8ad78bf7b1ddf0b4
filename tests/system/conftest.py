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
