//! Adapter packs end to end: the tiny-llama fixture adapters imported, decoded bitwise equal to
//! what `load_peft` reads, every kind of damage refused with its own error, the registry over a
//! mix of good and bad packs and over 10,000 packs, and the `edgelorad adapters` commands.

use std::path::{Path, PathBuf};

use edgelora_daemon::adapters::pack::{
    self, ImportRequest, Manifest, PACK_VERSION, PackDtype, PackError, fingerprint,
};
use edgelora_daemon::adapters::registry::{EntryState, Registry};
use edgelora_daemon::adapters::{LoraAdapter, LoraPair};
use edgelora_daemon::model::probe::probe_config;
use edgelora_daemon::model::{ModelConfig, Proj};
use edgelora_tests::{run_edgelorad, tiny, tmp_dir};

const ADAPTERS: [&str; 3] = ["alpha-qv", "beta-attn", "gamma-all"];

fn config() -> ModelConfig {
    probe_config(&tiny()).expect("tiny-llama config")
}

fn peft(name: &str) -> PathBuf {
    tiny().join("adapters").join(name)
}

fn fresh(tag: &str) -> PathBuf {
    let d = tmp_dir(&format!("adapter-pack-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn req(id: &str) -> ImportRequest {
    ImportRequest {
        id: id.into(),
        contributor: "fixture team".into(),
        license: Some("Apache-2.0".into()),
        display_name: None,
        replace: false,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn assert_same(want: &LoraAdapter, got: &LoraAdapter, what: &str) {
    assert_eq!(want.rank, got.rank, "{what}: rank");
    assert_eq!(want.alpha.to_bits(), got.alpha.to_bits(), "{what}: alpha");
    assert_eq!(
        want.scaling.to_bits(),
        got.scaling.to_bits(),
        "{what}: scaling"
    );
    assert_eq!(want.use_rslora, got.use_rslora, "{what}: rslora");
    assert_eq!(want.targets, got.targets, "{what}: targets");
    assert_eq!(want.layers.len(), got.layers.len(), "{what}: layers");
    for (i, (lw, lg)) in want.layers.iter().zip(&got.layers).enumerate() {
        for p in Proj::ALL {
            match (&lw[p.index()], &lg[p.index()]) {
                (None, None) => {}
                (Some(w), Some(g)) => {
                    assert_eq!(w.rank, g.rank);
                    assert_eq!(bits(&w.a), bits(&g.a), "{what}: layer {i} {p:?} A");
                    assert_eq!(bits(&w.b), bits(&g.b), "{what}: layer {i} {p:?} B");
                }
                _ => panic!("{what}: layer {i} {p:?} present in one only"),
            }
        }
    }
}

#[test]
fn fixture_adapters_round_trip_bitwise() {
    let c = config();
    let fp = fingerprint(&c);
    let dir = fresh("roundtrip");
    for name in ADAPTERS {
        let info = pack::import_peft(&peft(name), &dir, &req(name), &c).unwrap();
        assert_eq!(info.path, dir.join(format!("{name}.elpack")));
        assert_eq!(info.version, PACK_VERSION);
        assert_eq!(info.fingerprint, fp);
        assert_eq!(info.dtype, PackDtype::F32, "the fixtures are float32");
        assert_eq!(info.payload_offset % 4096, 0);
        assert_eq!(info.file_len % 4096, 0);
        assert!(info.tensors.iter().all(|t| t.offset % 4096 == 0));
        // Payload order: layer by layer, Proj::ALL order, A then B.
        let order: Vec<_> = info
            .tensors
            .iter()
            .map(|t| (t.layer, t.proj.index(), t.kind as u8))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        let m = &info.manifest;
        assert_eq!(
            (m.id.as_str(), m.display_name.as_str(), m.source.as_str()),
            (name, name, name)
        );
        assert_eq!(m.contributor, "fixture team");
        assert_eq!(m.license.as_deref(), Some("Apache-2.0"));
        assert_eq!(m.source_digest.len(), 64);
        assert!(m.created > 1_600_000_000);

        let again = pack::read_info(&info.path, &fp).unwrap();
        assert_eq!(again.tensors, info.tensors);
        let file = std::fs::read(&info.path).unwrap();
        assert_eq!(file.len() as u64, info.file_len);
        let head = &file[..pack::head_len(&file).unwrap()];
        let parsed = pack::parse_info(&info.path, head, file.len() as u64, &fp).unwrap();
        assert_eq!(parsed.payload_digest, info.payload_digest);
        let got = pack::decode(&info, &file, &c).unwrap();
        assert_eq!(got.name, name);
        let want = LoraAdapter::load_peft(&peft(name), &c).unwrap();
        assert_same(&want, &got, name);
        let got2 = pack::decode_payload(
            &info,
            &file[info.payload_range().start as usize..info.payload_range().end as usize],
            &c,
        )
        .unwrap();
        assert_same(&want, &got2, name);
        eprintln!(
            "{name}: rank {}, {} tensors, {} bytes ({} of f32 weights)",
            info.rank,
            info.tensors.len(),
            info.file_len,
            info.f32_bytes()
        );
    }
    // The same source digest on a second import (replace) of the same folder.
    let a = pack::read_info(&dir.join("alpha-qv.elpack"), &fp).unwrap();
    let b = pack::import_peft(
        &peft("alpha-qv"),
        &dir,
        &ImportRequest {
            replace: true,
            ..req("alpha-qv")
        },
        &c,
    )
    .unwrap();
    assert_eq!(a.manifest.source_digest, b.manifest.source_digest);
    assert_eq!(a.payload_digest, b.payload_digest);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn rounded(ad: &LoraAdapter, f: impl Fn(f32) -> f32) -> LoraAdapter {
    let mut out = ad.clone();
    for l in &mut out.layers {
        for p in l.iter_mut().flatten() {
            let a = p.a.iter().map(|&x| f(x)).collect();
            let b = p.b.iter().map(|&x| f(x)).collect();
            *p = LoraPair::new(p.rank, a, b).unwrap();
        }
    }
    out
}

#[test]
fn f16_and_bf16_packs_round_trip_bitwise() {
    let c = config();
    let fp = fingerprint(&c);
    let dir = fresh("narrow");
    let base = LoraAdapter::load_peft(&peft("gamma-all"), &c).unwrap();
    for (dtype, ad) in [
        (
            PackDtype::F16,
            rounded(&base, |x| half::f16::from_f32(x).to_f32()),
        ),
        (
            PackDtype::Bf16,
            rounded(&base, |x| half::bf16::from_f32(x).to_f32()),
        ),
        (PackDtype::F32, base.clone()),
    ] {
        let id = format!("gamma-{dtype}");
        let path = dir.join(format!("{id}.elpack"));
        let manifest = Manifest {
            id: id.clone(),
            display_name: "Gamma".into(),
            contributor: "c".into(),
            license: None,
            source_digest: String::new(),
            created: 0,
            source: "gamma-all".into(),
        };
        let n = pack::write_pack(&path, &ad, dtype, &fp, &manifest).unwrap();
        let info = pack::read_info(&path, &fp).unwrap();
        assert_eq!(info.dtype, dtype);
        assert_eq!(info.file_len, n);
        let got = pack::decode(&info, &std::fs::read(&path).unwrap(), &c).unwrap();
        assert_same(&ad, &got, &id);
        eprintln!("{id}: {n} bytes");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `bytes` as `<dir>/<tag>/<id>.elpack` (the file name must stay the manifest id).
fn damaged(dir: &Path, tag: &str, id: &str, bytes: &[u8]) -> PathBuf {
    let d = dir.join(tag);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(format!("{id}.elpack"));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn damage_is_refused_with_its_own_error() {
    let c = config();
    let fp = fingerprint(&c);
    let dir = fresh("refusals");
    let id = "beta-attn";
    let info = pack::import_peft(&peft(id), &dir, &req(id), &c).unwrap();
    let good = std::fs::read(&info.path).unwrap();
    let names_it = |e: &PackError| {
        assert!(e.to_string().contains(id), "message without the id: {e}");
        assert_eq!(e.adapter(), id);
    };

    // A flipped payload byte passes the index (the payload is not read) and fails the decode.
    let mut b = good.clone();
    b[info.payload_offset as usize + 17] ^= 0x40;
    let p = damaged(&dir, "payload", id, &b);
    let i = pack::read_info(&p, &fp).unwrap();
    let e = pack::decode(&i, &b, &c).unwrap_err();
    assert!(matches!(e, PackError::Digest { .. }), "{e:?}");
    assert_eq!(e.kind(), "digest_mismatch");
    names_it(&e);

    // Truncated: in the payload, in the metadata, in the header.
    for cut in [good.len() - 1, info.payload_offset as usize, 300, 100, 10] {
        let p = damaged(&dir, &format!("cut{cut}"), id, &good[..cut]);
        let e = pack::read_info(&p, &fp).unwrap_err();
        assert!(
            matches!(e, PackError::Truncated { .. }),
            "cut at {cut}: {e:?}"
        );
        names_it(&e);
    }
    // A decode from a short buffer.
    let e = pack::decode(&info, &good[..good.len() - 4096], &c).unwrap_err();
    assert!(matches!(e, PackError::Truncated { .. }), "{e:?}");

    // Another base model.
    let mut other = c.clone();
    other.rope_theta = 500000.0;
    let e = pack::read_info(&info.path, &fingerprint(&other)).unwrap_err();
    assert!(matches!(e, PackError::WrongBase { .. }), "{e:?}");
    assert_eq!(e.kind(), "wrong_base");
    names_it(&e);
    let e = pack::decode(&info, &good, &other).unwrap_err();
    assert!(matches!(e, PackError::WrongBase { .. }), "{e:?}");

    // Version 2.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let p = damaged(&dir, "v2", id, &b);
    let e = pack::read_info(&p, &fp).unwrap_err();
    assert!(
        matches!(
            e,
            PackError::UnknownVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e:?}"
    );
    names_it(&e);

    // Garbage, and an empty file.
    for (tag, bytes) in [
        (
            "garbage",
            b"GGUF\x03\0\0\0 something else entirely".to_vec(),
        ),
        ("empty", Vec::new()),
        (
            "safetensors",
            std::fs::read(peft(id).join("adapter_model.safetensors")).unwrap(),
        ),
    ] {
        let p = damaged(&dir, tag, id, &bytes);
        let e = pack::read_info(&p, &fp).unwrap_err();
        assert!(matches!(e, PackError::NotAPack { .. }), "{tag}: {e:?}");
        names_it(&e);
    }

    // Flipped header fields (rank, alpha, n_tensors, meta_len, payload_len, file_len), the
    // checksum itself, and metadata bytes (tensor table, manifest).
    let meta_end = pack::head_len(&good).unwrap();
    for at in [16, 48, 52, 68, 88, 104, 144, 230, 257, 270, meta_end - 3] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        let p = damaged(&dir, &format!("flip{at}"), id, &b);
        let e = pack::read_info(&p, &fp).unwrap_err();
        assert!(matches!(e, PackError::Corrupt { .. }), "byte {at}: {e:?}");
        assert_eq!(e.kind(), "corrupt");
        names_it(&e);
    }

    // Trailing bytes.
    let mut b = good.clone();
    b.extend([0u8; 16]);
    let p = damaged(&dir, "long", id, &b);
    assert_eq!(pack::read_info(&p, &fp).unwrap_err().kind(), "corrupt");

    // A pack renamed to another id.
    let p = damaged(&dir, "renamed", "not-beta", &good);
    let e = pack::read_info(&p, &fp).unwrap_err();
    assert_eq!(e.kind(), "invalid");
    assert!(
        e.to_string().contains("not-beta") && e.to_string().contains(id),
        "{e}"
    );

    // Import refusals: bad id, existing id, missing contributor, an adapter for another model.
    let e = pack::import_peft(&peft(id), &dir, &req("../escape"), &c).unwrap_err();
    assert_eq!(e.kind(), "invalid");
    assert!(e.to_string().contains("../escape"), "{e}");
    let e = pack::import_peft(&peft(id), &dir, &req(id), &c).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = pack::import_peft(
        &peft(id),
        &dir,
        &ImportRequest {
            contributor: " ".into(),
            ..req("nobody")
        },
        &c,
    )
    .unwrap_err();
    assert!(e.to_string().contains("contributor"), "{e}");
    let mut small = c.clone();
    small.hidden_size = 32;
    let e = pack::import_peft(&peft(id), &dir, &req("misfit"), &small).unwrap_err();
    assert_eq!(e.kind(), "invalid");
    assert!(e.to_string().contains("misfit"), "{e}");
    assert!(!dir.join("misfit.elpack").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn registry_lists_good_packs_available_and_bad_ones_with_their_kind() {
    let c = config();
    let fp = fingerprint(&c);
    let dir = fresh("registry");
    let mut reg = Registry::open(&dir, fp).unwrap();
    assert!(reg.is_empty());
    for name in ADAPTERS {
        let e = reg.import(&peft(name), &req(name), &c).unwrap();
        assert_eq!(e.state, EntryState::Available);
    }
    assert_eq!(
        reg.import(&peft("alpha-qv"), &req("a/b"), &c)
            .unwrap_err()
            .kind(),
        "invalid"
    );
    let gamma = std::fs::read(dir.join("gamma-all.elpack")).unwrap();
    let ad = LoraAdapter::load_peft(&peft("alpha-qv"), &c).unwrap();
    let manifest = |id: &str| Manifest {
        id: id.into(),
        display_name: id.into(),
        contributor: "x".into(),
        license: None,
        source_digest: String::new(),
        created: 0,
        source: "alpha-qv".into(),
    };
    // Cut gamma-all short; add packs of other kinds of damage.
    std::fs::write(dir.join("gamma-all.elpack"), &gamma[..gamma.len() - 5000]).unwrap();
    pack::write_pack(
        &dir.join("foreign.elpack"),
        &ad,
        PackDtype::F32,
        &[7; 32],
        &manifest("foreign"),
    )
    .unwrap();
    let mut v2 = pack::encode_pack(&ad, PackDtype::F32, &fp, &manifest("future")).unwrap();
    v2[8] = 2;
    std::fs::write(dir.join("future.elpack"), &v2).unwrap();
    let mut flip = pack::encode_pack(&ad, PackDtype::F32, &fp, &manifest("flipped")).unwrap();
    flip[48] ^= 4;
    std::fs::write(dir.join("flipped.elpack"), &flip).unwrap();
    std::fs::write(dir.join("noise.elpack"), vec![0xa5u8; 9000]).unwrap();
    std::fs::write(dir.join("README.txt"), b"not a pack").unwrap();

    let mut reg = Registry::open(&dir, fp).unwrap();
    let got: Vec<(String, &str)> = reg
        .iter()
        .map(|(id, e)| (id.to_string(), e.state.label()))
        .collect();
    let want = [
        ("alpha-qv", "available"),
        ("beta-attn", "available"),
        ("flipped", "corrupt"),
        ("foreign", "wrong_base"),
        ("future", "unknown_version"),
        ("gamma-all", "truncated"),
        ("noise", "not_a_pack"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b)).to_vec(),
        "registry states"
    );
    for (id, e) in reg.iter() {
        if let EntryState::Unavailable(msg, _) = &e.state {
            assert!(msg.contains(id), "{id}: {msg}");
        }
    }
    assert!(reg.get("foreign").unwrap().info.is_some());
    assert!(reg.get("gamma-all").unwrap().info.is_some());
    assert!(reg.get("noise").unwrap().info.is_none());
    assert_eq!(reg.get("alpha-qv").unwrap().info.as_ref().unwrap().rank, 8);

    // Replace the damaged one; remove another.
    let e = reg
        .import(
            &peft("gamma-all"),
            &ImportRequest {
                replace: true,
                ..req("gamma-all")
            },
            &c,
        )
        .unwrap();
    assert_eq!(e.state, EntryState::Available);
    reg.remove("noise").unwrap();
    assert!(reg.get("noise").is_none() && !dir.join("noise.elpack").exists());
    let reg = Registry::open(&dir, fp).unwrap();
    assert_eq!(reg.len(), 6);
    assert_eq!(reg.get("gamma-all").unwrap().state, EntryState::Available);

    // resolve_in_dir: inside yes, escapes no.
    assert!(reg.resolve_in_dir(Path::new("alpha-qv.elpack")).is_ok());
    assert!(reg.resolve_in_dir(Path::new("../")).is_err());
    assert!(reg.resolve_in_dir(&tiny().join("config.json")).is_err());
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(tiny().join("config.json"), dir.join("out.elpack")).unwrap();
        let e = reg.resolve_in_dir(Path::new("out.elpack")).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn registry_indexes_ten_thousand_packs() {
    let c = config();
    let fp = fingerprint(&c);
    let dir = fresh("ten-thousand");
    let (out, inp) = Proj::Q.shape(&c);
    let mut layers: Vec<[Option<LoraPair>; 7]> =
        (0..c.n_layers).map(|_| Default::default()).collect();
    layers[0][Proj::Q.index()] =
        Some(LoraPair::new(1, (0..inp).map(|i| i as f32).collect(), vec![0.5; out]).unwrap());
    let ad = LoraAdapter {
        name: "tiny".into(),
        rank: 1,
        alpha: 1.0,
        use_rslora: false,
        scaling: 1.0,
        layers,
        targets: vec![Proj::Q],
    };
    const N: usize = 10_000;
    let t0 = std::time::Instant::now();
    let mut bytes = 0u64;
    for i in 0..N {
        let id = format!("skill-{i:05}");
        let m = Manifest {
            id: id.clone(),
            display_name: format!("Skill {i}"),
            contributor: format!("contributor {}", i % 37),
            license: Some("MIT".into()),
            source_digest: "ab".repeat(32),
            created: 1_700_000_000 + i as u64,
            source: "synthetic".into(),
        };
        let b = pack::encode_pack(&ad, PackDtype::F16, &fp, &m).unwrap();
        bytes += b.len() as u64;
        std::fs::write(dir.join(format!("{id}.elpack")), b).unwrap();
    }
    let gen_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let reg = Registry::open(&dir, fp).unwrap();
    let cold = t1.elapsed().as_secs_f64();
    assert_eq!(reg.len(), N);
    assert!(reg.iter().all(|(_, e)| e.state == EntryState::Available));
    assert_eq!(
        reg.get("skill-04242")
            .unwrap()
            .info
            .as_ref()
            .unwrap()
            .manifest
            .display_name,
        "Skill 4242"
    );
    let t2 = std::time::Instant::now();
    let again = Registry::open(&dir, fp).unwrap();
    let warm = t2.elapsed().as_secs_f64();
    assert_eq!(again.len(), N);
    println!(
        "indexed {N} packs ({:.1} MB) in {:.3} s just after writing them, {:.3} s again \
         ({:.1} us per pack); generating them took {gen_secs:.1} s",
        bytes as f64 / 1e6,
        cold,
        warm,
        warm * 1e6 / N as f64
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tiny_str() -> String {
    tiny().display().to_string()
}

fn adapters_cmd(args: &[&str], dir: &Path) -> (bool, String, String) {
    let d = dir.display().to_string();
    let m = tiny_str();
    let mut all: Vec<&str> = vec!["adapters"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--adapters", &d, "--model", &m]);
    run_edgelorad(&all)
}

#[test]
fn cli_imports_lists_shows_and_removes() {
    let dir = fresh("cli");
    for name in ADAPTERS {
        let p = peft(name).display().to_string();
        let (ok, out, err) = adapters_cmd(
            &[
                "import",
                &p,
                "--id",
                name,
                "--contributor",
                "Ada Lovelace",
                "--license",
                "Apache-2.0",
                "--name",
                &format!("The {name} skill"),
            ],
            &dir,
        );
        assert!(ok, "import {name}: {err}");
        assert!(out.contains(&format!("imported {name}")), "{out}");
    }
    assert!(dir.join("gamma-all.elpack").is_file());

    let (ok, out, err) = adapters_cmd(&["list", "--json"], &dir);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    for (e, (name, rank, n_targets)) in arr.iter().zip([
        ("alpha-qv", 8, 2),
        ("beta-attn", 4, 4),
        ("gamma-all", 16, 7),
    ]) {
        assert_eq!(e["id"], name);
        assert_eq!(e["state"], "available");
        assert_eq!(e["rank"], rank);
        assert_eq!(e["targets"].as_array().unwrap().len(), n_targets);
        assert_eq!(e["contributor"], "Ada Lovelace");
        assert_eq!(e["license"], "Apache-2.0");
        assert_eq!(e["display_name"], format!("The {name} skill"));
        assert_eq!(e["dtype"], "f32");
    }

    let (ok, out, err) = adapters_cmd(&["list"], &dir);
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("gamma-all")
            && l.contains("all")
            && l.contains("Ada Lovelace")
            && l.ends_with("available")),
        "{out}"
    );

    let (ok, out, err) = adapters_cmd(&["show", "alpha-qv"], &dir);
    assert!(ok, "{err}");
    for want in [
        "Ada Lovelace",
        "Apache-2.0",
        "The alpha-qv skill",
        "q_proj, v_proj",
        "available",
        "(this model)",
    ] {
        assert!(out.contains(want), "show lacks {want:?}:\n{out}");
    }
    let (ok, out, _) = adapters_cmd(&["show", "beta-attn", "gamma-all", "--json"], &dir);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[1]["rank"], 16);

    // Refusals: a bad id, an existing id, an unknown id, a model the adapter does not fit.
    let p = peft("alpha-qv").display().to_string();
    let (ok, _, err) = adapters_cmd(
        &["import", &p, "--id", "../evil", "--contributor", "x"],
        &dir,
    );
    assert!(!ok);
    assert!(err.contains("../evil") && err.contains("'/'"), "{err}");
    let (ok, _, err) = adapters_cmd(
        &["import", &p, "--id", "alpha-qv", "--contributor", "x"],
        &dir,
    );
    assert!(!ok);
    assert!(
        err.contains("alpha-qv") && err.contains("already exists"),
        "{err}"
    );
    let (ok, _, err) = adapters_cmd(&["show", "nope"], &dir);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = adapters_cmd(&["remove", "nope"], &dir);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, out, err) = adapters_cmd(
        &[
            "import",
            &p,
            "--id",
            "alpha-qv",
            "--contributor",
            "Grace Hopper",
            "--replace",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    assert!(out.contains("imported alpha-qv"));

    let (ok, out, err) = adapters_cmd(&["remove", "beta-attn"], &dir);
    assert!(ok, "{err}");
    assert!(out.contains("removed beta-attn"));
    assert!(!dir.join("beta-attn.elpack").exists());
    let (ok, out, _) = adapters_cmd(&["list", "--json"], &dir);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha-qv", "gamma-all"]);
    assert_eq!(v[0]["contributor"], "Grace Hopper");

    // A damaged pack shows up as unavailable, with its error, and does not fail the listing.
    std::fs::write(dir.join("broken.elpack"), b"nope").unwrap();
    let (ok, out, _) = adapters_cmd(&["list", "--json"], &dir);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[1]["id"], "broken");
    assert_eq!(v[1]["state"], "unavailable");
    assert_eq!(v[1]["error_kind"], "not_a_pack");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_takes_a_pack_as_it_takes_the_peft_folder() {
    let dir = fresh("generate-pack");
    let tiny_s = tiny().display().to_string();
    let src = peft("gamma-all").display().to_string();
    let dir_s = dir.display().to_string();
    let (ok, _, err) = run_edgelorad(&[
        "adapters",
        "import",
        &src,
        "--id",
        "gamma",
        "--contributor",
        "fixture",
        "--adapters",
        &dir_s,
        "--model",
        &tiny_s,
    ]);
    assert!(ok, "{err}");
    let pack = dir.join("gamma.elpack").display().to_string();
    let run = |adapter: &str| {
        let (ok, out, err) = run_edgelorad(&[
            "generate",
            "--model",
            &tiny_s,
            "--adapter",
            adapter,
            "--prompt-tokens",
            "0,386,414,16,203",
            "--max-tokens",
            "8",
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(ok, "{err}");
        out
    };
    let from_pack = run(&pack);
    assert!(from_pack.contains("ids"), "{from_pack}");
    assert_eq!(from_pack, run(&src));
    // A pack is checked against the model like the server does.
    let other = tiny().join("tiny-llama-gptq").display().to_string();
    let (ok, _, _) = run_edgelorad(&[
        "generate",
        "--model",
        &other,
        "--adapter",
        &pack,
        "--prompt-tokens",
        "1,2",
        "--max-tokens",
        "1",
    ]);
    assert!(
        ok,
        "the GPTQ copy of the same model has the same fingerprint"
    );
    std::fs::remove_dir_all(&dir).ok();
}
