"""Target profiles: the shipped ones load, bad data fails in one line that names the field and the fix."""

import pytest

from compressor.targets.profile import (
    ProfileError,
    SshConnection,
    TargetProfile,
    list_profiles,
    load_profile,
    parse_profile,
)

SHIPPED = {
    "x86-cpu": "local/onnxruntime",
    "jetson-orin-nano": "ssh/trtexec",
    "jetson-agx-orin": "ssh/trtexec",
    "arm64-linux": "ssh/onnxruntime",
    "android-phone": "adb/ort-perf-test",
}


def _ssh_ort(**overrides):
    data = {
        "name": "board",
        "connection": {"kind": "ssh", "host": "10.0.0.2", "user": "pi"},
        "runtime": {"kind": "onnxruntime"},
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("name, kind", sorted(SHIPPED.items()))
def test_shipped_profiles_load_and_are_what_their_name_says(name, kind):
    profile = load_profile(name)
    assert isinstance(profile, TargetProfile)
    assert profile.name == name
    assert profile.kind == kind


def test_list_profiles_includes_every_shipped_profile():
    assert set(SHIPPED) <= set(list_profiles())


def test_jetson_profiles_record_power_mode_and_clocks():
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        setup = load_profile(name).device_setup
        assert setup.nvpmodel == 0 and setup.jetson_clocks and not setup.apply


def test_load_by_path_and_search_path_env(tmp_path, monkeypatch):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "lab-board.yaml").write_text(
        "name: lab-board\nconnection: {kind: ssh, host: lab.example, port: 2200}\nruntime: {kind: onnxruntime}\n"
    )
    monkeypatch.setenv("COMPRESSOR_TARGETS_PATH", str(own))

    by_name = load_profile("lab-board")
    by_path = load_profile(str(own / "lab-board.yaml"))

    assert by_name == by_path
    assert isinstance(by_name.connection, SshConnection) and by_name.connection.port == 2200
    assert "lab-board" in list_profiles()


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"unknown target 'pixel-99'; known targets: .*x86-cpu"):
        load_profile("pixel-99")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"connection": {"kind": "ssh", "host": "h", "port": 70000}}, r"connection\.ssh\.port: .*65535"),
        ({"connection": {"kind": "ssh", "host": "-oProxyCommand=x"}}, r"connection\.ssh\.host: .*hostname"),
        ({"connection": {"kind": "telnet", "host": "h"}}, r"connection: .*'local', 'ssh', 'adb'"),
        ({"runtime": {"kind": "onnxruntime", "providers": ["CUDA"]}}, r"not an ONNX Runtime provider"),
        ({"runtime": {"kind": "onnxruntime"}, "precision": "fp16"}, r"TensorRT build flag"),
        ({"threads": -1}, r"threads: .*greater than or equal to 0"),
        ({"shapes": {"sequence": 0}}, r"shapes\.sequence=0"),
        ({"colour": "red"}, r"unknown field 'colour'"),
        ({"name": "Bad Name"}, r"name: String should match pattern"),
    ],
)
def test_invalid_profiles_fail_in_one_line_naming_the_field(overrides, message):
    with pytest.raises(ProfileError, match=message) as info:
        parse_profile(_ssh_ort(**overrides), "test.yaml")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("target profile test.yaml: ")


def test_runtime_and_connection_must_fit_together():
    adb_with_ort = {"name": "p", "connection": {"kind": "adb"}, "runtime": {"kind": "onnxruntime"}}
    perf_over_ssh = _ssh_ort(runtime={"kind": "ort-perf-test"})

    with pytest.raises(ProfileError, match="connection 'adb' needs runtime kind 'ort-perf-test'"):
        parse_profile(adb_with_ort)
    with pytest.raises(ProfileError, match="runs on an adb device"):
        parse_profile(perf_over_ssh)


def test_yaml_is_data_only(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\nruntime: {kind: onnxruntime}\n")

    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile(str(evil))


def test_missing_profile_file_and_non_mapping(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")

    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match="must be a YAML mapping, got list"):
        load_profile(str(listed))


def test_ssh_paths_expand_home_and_destination_includes_user(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    conn = parse_profile(_ssh_ort()).connection

    assert conn.destination == "pi@10.0.0.2"
    assert conn.known_hosts_path == "/home/someone/.ssh/known_hosts"
    assert conn.key_path is None
