//! GPU telemetry against fake Jetson sysfs trees, and its Prometheus export.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;

use edgelora_hal::HalError;
use edgelora_hal::telemetry::{
    GpuSample, GpuTelemetry, JetsonSysfs, Nvml, StaticTelemetry, auto_detect, metrics,
};
use prometheus_client::registry::Registry;
use tempfile::TempDir;

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A Jetson AGX Orin (JetPack 5) as the kernel lays it out: the devfreq entry links to the
/// platform device, two thermal zones before the GPU's, two INA3221 monitors.
fn orin_tree() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let dev = "sys/devices/platform/17000000.ga10b";
    write(root, &format!("{dev}/load"), "523\n");
    write(root, &format!("{dev}/of_node/name"), "ga10b\0");
    let devfreq = "sys/class/devfreq/17000000.ga10b";
    write(root, &format!("{devfreq}/cur_freq"), "918000000\n");
    write(root, &format!("{devfreq}/max_freq"), "1300500000\n");
    symlink(root.join(dev), root.join(devfreq).join("device")).unwrap();
    // Another devfreq device that is not the GPU, sorted first.
    write(
        root,
        "sys/class/devfreq/15340000.vic/cur_freq",
        "115200000\n",
    );
    write(
        root,
        "sys/class/devfreq/15340000.vic/device/of_node/name",
        "vic\0",
    );

    write(root, "sys/class/thermal/thermal_zone0/type", "CPU-therm\n");
    write(root, "sys/class/thermal/thermal_zone0/temp", "45000\n");
    write(root, "sys/class/thermal/thermal_zone10/type", "tj-therm\n");
    write(root, "sys/class/thermal/thermal_zone10/temp", "49000\n");
    write(root, "sys/class/thermal/thermal_zone1/type", "GPU-therm\n");
    write(root, "sys/class/thermal/thermal_zone1/temp", "47500\n");

    let ina0 = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3";
    write(root, &format!("{ina0}/in1_label"), "VDD_GPU_SOC\n");
    write(root, &format!("{ina0}/in1_input"), "5000\n");
    write(root, &format!("{ina0}/curr1_input"), "1500\n");
    write(root, &format!("{ina0}/in2_label"), "VDD_CPU_CV\n");
    write(root, &format!("{ina0}/in2_input"), "5000\n");
    write(root, &format!("{ina0}/curr2_input"), "800\n");
    write(root, &format!("{ina0}/in3_label"), "VIN_SYS_5V0\n");
    write(root, &format!("{ina0}/in3_input"), "5000\n");
    write(root, &format!("{ina0}/curr3_input"), "1200\n");
    write(
        root,
        &format!("{ina0}/in7_label"),
        "sum of shunt voltages\n",
    );
    let ina1 = "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4";
    write(root, &format!("{ina1}/in1_label"), "NC\n");
    write(root, &format!("{ina1}/in2_label"), "VDDQ_VDD2_1V8AO\n");
    write(root, &format!("{ina1}/in2_input"), "5000\n");
    write(root, &format!("{ina1}/curr2_input"), "300\n");
    // The driver directory also holds files, not devices.
    write(root, "sys/bus/i2c/drivers/ina3221/uevent", "");

    write(
        root,
        "proc/meminfo",
        "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nBuffers:          100000 kB\n",
    );
    dir
}

fn only_sample(jetson: &JetsonSysfs) -> GpuSample {
    let samples = jetson.sample().expect("sample");
    assert_eq!(samples.len(), 1);
    samples.into_iter().next().unwrap()
}

#[test]
fn orin_tree_reads_every_field_in_its_unit() {
    let tree = orin_tree();
    let jetson = JetsonSysfs::open(tree.path()).unwrap();
    assert_eq!(jetson.gpu_name(), "ga10b");
    assert_eq!(
        jetson.power_rail_labels().collect::<Vec<_>>(),
        ["VDD_GPU_SOC"]
    );
    let s = only_sample(&jetson);
    assert_eq!(
        s,
        GpuSample {
            index: 0,
            name: "ga10b".to_owned(),
            memory_used_bytes: Some(12_000_000 * 1024),
            memory_free_bytes: Some(20_000_000 * 1024),
            memory_total_bytes: Some(32_000_000 * 1024),
            temperature_c: Some(47.5),
            power_mw: Some(7500),
            utilization_pct: Some(52.3),
            sm_clock_mhz: Some(918),
            mem_clock_mhz: None,
            source: "jetson-sysfs",
        }
    );
    assert_eq!(jetson.name(), "jetson-sysfs");
}

#[test]
fn readings_follow_the_files_between_samples() {
    let tree = orin_tree();
    let jetson = JetsonSysfs::open(tree.path()).unwrap();
    write(
        tree.path(),
        "sys/devices/platform/17000000.ga10b/load",
        "1000\n",
    );
    write(
        tree.path(),
        "sys/class/devfreq/17000000.ga10b/cur_freq",
        "1300500000\n",
    );
    let s = only_sample(&jetson);
    assert_eq!(s.utilization_pct, Some(100.0));
    assert_eq!(s.sm_clock_mhz, Some(1301), "rounded to the nearest MHz");
}

#[test]
fn jetpack6_gpu_node_and_legacy_load_path_are_found() {
    // Orin on JetPack 6 names the node 17000000.gpu; boards before Xavier keep the load in
    // /sys/devices/gpu.0/load instead of under the devfreq device.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "sys/class/devfreq/17000000.gpu/cur_freq",
        "306000000\n",
    );
    write(dir.path(), "sys/devices/gpu.0/load", "42\n");
    let jetson = JetsonSysfs::open(dir.path()).unwrap();
    assert_eq!(jetson.gpu_name(), "gpu");
    let s = only_sample(&jetson);
    assert_eq!(s.utilization_pct, Some(4.2));
    assert_eq!(s.sm_clock_mhz, Some(306));
}

#[test]
fn missing_optional_files_are_none_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "sys/class/devfreq/17000000.ga10b/cur_freq",
        "918000000\n",
    );
    let s = only_sample(&JetsonSysfs::open(dir.path()).unwrap());
    assert_eq!(s.sm_clock_mhz, Some(918));
    assert_eq!(s.utilization_pct, None);
    assert_eq!(s.temperature_c, None);
    assert_eq!(s.power_mw, None);
    assert_eq!(s.memory_total_bytes, None);
    assert_eq!(s.memory_used_bytes, None);
}

#[test]
fn a_power_rail_without_its_current_file_gives_no_power_rather_than_a_wrong_one() {
    let tree = orin_tree();
    std::fs::remove_file(
        tree.path()
            .join("sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr1_input"),
    )
    .unwrap();
    let s = only_sample(&JetsonSysfs::open(tree.path()).unwrap());
    assert_eq!(s.power_mw, None);
    assert_eq!(s.temperature_c, Some(47.5));
}

#[test]
fn an_unreadable_gpu_thermal_zone_reads_as_no_temperature() {
    // Orin's GPU-therm refuses reads while the GPU is power-gated. A directory in place of the
    // file gives the same kind of failure (EISDIR), even to root.
    let tree = orin_tree();
    let temp = tree.path().join("sys/class/thermal/thermal_zone1/temp");
    std::fs::remove_file(&temp).unwrap();
    std::fs::create_dir(&temp).unwrap();
    let s = only_sample(&JetsonSysfs::open(tree.path()).unwrap());
    assert_eq!(s.temperature_c, None);
    assert_eq!(s.utilization_pct, Some(52.3));
}

fn parse_error_of(tree: &TempDir) -> String {
    let jetson = JetsonSysfs::open(tree.path()).unwrap();
    match jetson.sample() {
        Err(e @ HalError::Parse { .. }) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn garbage_is_an_error_naming_the_file_and_what_was_expected() {
    let cases = [
        (
            "sys/devices/platform/17000000.ga10b/load",
            "busy\n",
            "per mille",
        ),
        (
            "sys/devices/platform/17000000.ga10b/load",
            "1500\n",
            "per mille",
        ),
        ("sys/class/devfreq/17000000.ga10b/cur_freq", "-1\n", "Hz"),
        (
            "sys/class/thermal/thermal_zone1/temp",
            "hot\n",
            "millidegrees",
        ),
        (
            "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/in1_input",
            "5 V\n",
            "mV",
        ),
        (
            "proc/meminfo",
            "MemTotal: lots kB\nMemAvailable: 1 kB\n",
            "kB",
        ),
    ];
    for (file, content, expected) in cases {
        let tree = orin_tree();
        write(tree.path(), file, content);
        let message = parse_error_of(&tree);
        let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert!(message.contains(file_name), "{file}: {message}");
        assert!(message.contains(expected), "{file}: {message}");
        let first_line = content.lines().next().unwrap();
        assert!(message.contains(first_line), "{file}: {message}");
    }
}

#[test]
fn a_machine_without_a_tegra_gpu_is_not_a_jetson() {
    let dir = tempfile::tempdir().unwrap();
    // A desktop's devfreq: memory controller and a non-Tegra GPU, no Tegra GPU node.
    write(dir.path(), "sys/class/devfreq/dmc/cur_freq", "800000000\n");
    write(
        dir.path(),
        "sys/class/devfreq/fde60000.mali/cur_freq",
        "200000000\n",
    );
    write(
        dir.path(),
        "proc/meminfo",
        "MemTotal: 1 kB\nMemAvailable: 1 kB\n",
    );
    match JetsonSysfs::open(dir.path()) {
        Err(e @ HalError::Missing { .. }) => {
            let message = e.to_string();
            assert!(message.contains("sys/class/devfreq"), "{message}");
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    let empty = tempfile::tempdir().unwrap();
    assert!(JetsonSysfs::open(empty.path()).is_err());

    if Nvml::init().is_err() {
        assert!(auto_detect(dir.path()).is_none());
        let jetson = orin_tree();
        let found = auto_detect(jetson.path()).expect("the Jetson tree is found");
        assert_eq!(found.name(), "jetson-sysfs");
    }
}

#[test]
fn nvml_without_a_driver_is_an_error_not_a_panic() {
    // On a machine with an NVIDIA driver the init succeeds; then sampling must work.
    match Nvml::init() {
        Err(e) => assert!(e.to_string().contains("NVML init"), "{e}"),
        Ok(nvml) => {
            let samples = nvml.sample().unwrap();
            assert!(samples.iter().all(|s| s.source == "nvml"));
        }
    }
}

fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[test]
fn metrics_export_present_readings_in_base_units_with_labels() {
    let full = GpuSample {
        index: 0,
        name: "NVIDIA H100".to_owned(),
        memory_used_bytes: Some(1024),
        memory_free_bytes: Some(3072),
        memory_total_bytes: Some(4096),
        temperature_c: Some(61.0),
        power_mw: Some(7500),
        utilization_pct: Some(52.5),
        sm_clock_mhz: Some(1980),
        mem_clock_mhz: Some(2619),
        source: "nvml",
    };
    let sparse = GpuSample {
        index: 1,
        name: "NVIDIA H100".to_owned(),
        memory_total_bytes: Some(8192),
        source: "nvml",
        ..GpuSample::default()
    };
    let mut registry = Registry::with_prefix("edgelora");
    metrics::register(
        &mut registry,
        Arc::new(StaticTelemetry {
            samples: vec![full, sparse],
        }),
    );
    let text = render(&registry);
    let labels0 = r#"gpu="0",name="NVIDIA H100",source="nvml""#;
    let labels1 = r#"gpu="1",name="NVIDIA H100",source="nvml""#;
    for line in [
        r#"edgelora_gpu_telemetry_up{source="static"} 1"#.to_owned(),
        format!("edgelora_gpu_memory_used_bytes{{{labels0}}} 1024"),
        format!("edgelora_gpu_memory_free_bytes{{{labels0}}} 3072"),
        format!("edgelora_gpu_memory_total_bytes{{{labels0}}} 4096"),
        format!("edgelora_gpu_memory_total_bytes{{{labels1}}} 8192"),
        format!("edgelora_gpu_temperature_celsius{{{labels0}}} 61.0"),
        format!("edgelora_gpu_power_watts{{{labels0}}} 7.5"),
        format!("edgelora_gpu_utilization_ratio{{{labels0}}} 0.525"),
        format!("edgelora_gpu_sm_clock_hertz{{{labels0}}} 1980000000"),
        format!("edgelora_gpu_memory_clock_hertz{{{labels0}}} 2619000000"),
        "# TYPE edgelora_gpu_power_watts gauge".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // GPU 1 has no temperature: no line, not a 0.
    assert!(
        !text.contains(&format!("edgelora_gpu_temperature_celsius{{{labels1}}}")),
        "{text}"
    );
}

#[derive(Debug)]
struct Broken;

impl GpuTelemetry for Broken {
    fn sample(&self) -> Result<Vec<GpuSample>, HalError> {
        Err(HalError::Missing {
            path: "/sys/class/devfreq/17000000.ga10b".into(),
            what: "GPU",
        })
    }
    fn name(&self) -> &str {
        "broken"
    }
}

#[test]
fn a_failed_sample_exports_up_zero_and_no_readings() {
    let mut registry = Registry::default();
    metrics::register(&mut registry, Arc::new(Broken));
    let text = render(&registry);
    assert!(
        text.lines()
            .any(|l| l == r#"gpu_telemetry_up{source="broken"} 0"#),
        "{text}"
    );
    assert!(!text.contains("gpu_memory"), "{text}");
}

#[test]
fn jetson_tree_end_to_end_to_prometheus_text() {
    let tree = orin_tree();
    let mut registry = Registry::with_prefix("edgelora");
    metrics::register(
        &mut registry,
        Arc::new(JetsonSysfs::open(tree.path()).unwrap()),
    );
    let text = render(&registry);
    let labels = r#"gpu="0",name="ga10b",source="jetson-sysfs""#;
    for line in [
        format!("edgelora_gpu_power_watts{{{labels}}} 7.5"),
        format!("edgelora_gpu_temperature_celsius{{{labels}}} 47.5"),
        format!("edgelora_gpu_sm_clock_hertz{{{labels}}} 918000000"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("gpu_memory_clock"), "{text}");
}
