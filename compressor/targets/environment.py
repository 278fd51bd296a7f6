"""Record (and, when asked, apply) the device state that decides latency: power mode, clocks, governor.

The ONNX Runtime path records its environment inside device_bench.py. Runners that drive a native tool
(trtexec, onnxruntime_perf_test) have no Python on the device to rely on, so they run these POSIX shell
probes instead; each prints `key=value` lines that `parse_kv` reads.
"""

from __future__ import annotations

import shlex

from compressor.errors import MeasurementError
from compressor.targets.base import Transport, last_line
from compressor.targets.profile import DeviceSetup

LINUX_PROBE = r"""
kv() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n\t' '  ' | tr -d '\000')"; }
kv os "$(uname -srvm 2>/dev/null)"
kv hostname "$(uname -n 2>/dev/null)"
kv device_model "$(cat /proc/device-tree/model 2>/dev/null)"
kv l4t_release "$(head -n 1 /etc/nv_tegra_release 2>/dev/null)"
kv jetpack "$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null)"
kv tensorrt_package "$(dpkg-query -W -f='${Version}' tensorrt 2>/dev/null)"
kv nvpmodel "$(nvpmodel -q 2>/dev/null)"
kv cpu_model "$(grep -m 1 -E '^(model name|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)"
kv cpu_count "$(nproc 2>/dev/null)"
kv cpu_governor "$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"
kv cpu_cur_freq_khz "$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq 2>/dev/null)"
kv load_average "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
for d in /sys/class/devfreq/*; do
  [ -r "$d/cur_freq" ] && kv "devfreq.$(basename "$d")" "$(cat "$d/cur_freq") Hz (max $(cat "$d/max_freq" 2>/dev/null))"
done
exit 0
"""

ANDROID_PROBE = r"""
kv() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n\t' '  ')"; }
kv device_model "$(getprop ro.product.manufacturer) $(getprop ro.product.model)"
kv android_release "$(getprop ro.build.version.release)"
kv android_sdk "$(getprop ro.build.version.sdk)"
kv build_fingerprint "$(getprop ro.build.fingerprint)"
kv soc "$(getprop ro.soc.manufacturer) $(getprop ro.soc.model)"
kv board_platform "$(getprop ro.board.platform)"
kv abi "$(getprop ro.product.cpu.abi)"
kv os "$(uname -srm 2>/dev/null)"
kv cpu_count "$(nproc 2>/dev/null)"
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  [ -r "$c/cpufreq/scaling_governor" ] && kv "governor.$(basename "$c")" "$(cat "$c/cpufreq/scaling_governor") $(cat "$c/cpufreq/scaling_cur_freq" 2>/dev/null) kHz"
done
kv thermal_status "$(dumpsys thermalservice 2>/dev/null | grep -m 1 'Thermal Status')"
exit 0
"""


def parse_kv(text: str) -> dict[str, str | None]:
    """`key=value` lines into a dict; empty values become None (the fact was not available)."""
    found: dict[str, str | None] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and " " not in key:
            found[key.strip()] = value.strip() or None
    return found


def probe(transport: Transport, script: str, *, timeout_s: float = 60) -> dict[str, str | None]:
    res = transport.run(["sh", "-c", script], timeout_s=timeout_s, what="recording the device environment")
    return parse_kv(res.stdout)


def setup_commands(setup: DeviceSetup) -> list[list[str]]:
    """The commands that put a Linux device into the profile's power/clock state (sudo -n: never prompt)."""
    commands: list[list[str]] = []
    if setup.nvpmodel is not None:
        commands.append(["sudo", "-n", "nvpmodel", "-m", str(setup.nvpmodel)])
    if setup.jetson_clocks:
        commands.append(["sudo", "-n", "jetson_clocks"])
    if setup.cpu_governor:
        gov = shlex.quote(setup.cpu_governor)
        loop = f'for f in /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor; do echo {gov} > "$f"; done'
        commands.append(["sudo", "-n", "sh", "-c", loop])
    return commands


def apply_setup(transport: Transport, setup: DeviceSetup) -> list[str]:
    """Apply the profile's device setup when `apply: true`; return what was done (for the record)."""
    if not setup.apply:
        return []
    done = []
    for argv in setup_commands(setup):
        res = transport.run(argv, timeout_s=120, what=f"applying device setup ({argv[2]})")
        if res.returncode != 0:
            raise MeasurementError(
                f"{transport.description}: '{' '.join(argv[2:4])}' failed ({last_line(res.stderr)}); applying "
                "device_setup needs passwordless sudo for it on the device, or set device_setup.apply: false"
            )
        done.append(" ".join(argv))
    return done
