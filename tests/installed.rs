//! The binary as installed (`cargo install --path crates/triage`): run from an empty folder,
//! with no repository around, it uses its built-in defaults (training configuration,
//! connector mappings, synthetic seed material, taxonomy, prompts), and the flag, the
//! environment variable and the user config file (`$XDG_CONFIG_HOME/triage/config.toml`)
//! override them in that order.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh empty folder as the working directory, and an empty config folder.
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("triage-installed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::create_dir_all(dir.join("config")).unwrap();
        Sandbox { dir }
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("config/triage/config.toml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_triage"));
        c.args(args)
            .current_dir(self.work())
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("RUST_LOG", "warn");
        for var in [
            "TRIAGE_CONFIG",
            "TRIAGE_TAXONOMY",
            "TRIAGE_MODEL",
            "TRIAGE_TRAIN_CONFIG",
            "TRIAGE_SYNTH_SEEDS",
            "TRIAGE_JIRA_MAPPING",
            "TRIAGE_ADAPTERS",
            "TRIAGE_TOKEN",
        ] {
            c.env_remove(var);
        }
        c
    }

    fn run(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        let mut child = self
            .command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GOOD: &str = r#"{"summary":"VPN drops every 10 minutes since the update; payroll due today","category":"Network","subcategory":"VPN","priority":"Critical","assignment_group":"Network Operations","request_type":"Incident"}"#;

#[test]
fn data_synth_and_push_work_from_an_empty_folder_with_built_in_defaults() {
    let s = Sandbox::new("offline");
    // Synthetic data from the built-in seeds: the same bytes as from the shipped folder.
    let out = s.run(
        &["data", "synth", "--n", "40", "--seed", "3", "-o", "a.jsonl"],
        "",
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("built-in data/synth/default"),
        "{}",
        text(&out.stderr)
    );
    let seeds = repo().join("data/synth/default");
    let out = s.run(
        &["data", "synth", "--n", "40", "--seed", "3", "-o", "b.jsonl"],
        "",
        &[("TRIAGE_SYNTH_SEEDS", seeds.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(s.work().join("a.jsonl")).unwrap(),
        std::fs::read(s.work().join("b.jsonl")).unwrap()
    );
    // The Jira mapping is built in.
    let out = s.run(&["push", "jira", "--dry-run"], GOOD, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("/rest/api/3/issue"),
        "{}",
        text(&out.stdout)
    );
    // The user config file overrides the built-in mapping, the environment overrides the file.
    std::fs::create_dir_all(s.config_file().parent().unwrap()).unwrap();
    std::fs::write(s.config_file(), "[connectors]\njira = \"missing-jira.toml\"\n").unwrap();
    let out = s.run(&["push", "jira", "--dry-run"], GOOD, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing-jira.toml"),
        "{}",
        text(&out.stderr)
    );
    let mapping = repo().join("configs/connectors/jira.toml");
    let out = s.run(
        &["push", "jira", "--dry-run"],
        GOOD,
        &[("TRIAGE_JIRA_MAPPING", mapping.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `triage config` says where each setting comes from.
    let out = s.run(&["config", "--json"], "", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config_file_state"], "read");
    assert!(
        v["connectors"]["jira"]
            .as_str()
            .unwrap()
            .contains("`connectors` in"),
        "{v}"
    );
    assert_eq!(v["train_config"], "built-in configs/train.toml");
    // A broken config file is an error naming the file and line.
    std::fs::write(s.config_file(), "train_config = \"t.toml\"\ncolour = 1\n").unwrap();
    let out = s.run(&["config"], "", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("config.toml:2:") && err.contains("colour"), "{err}");
}

/// `serve` reads its training configuration from the flag, the environment, the user config
/// file or the built-in copy, in that order: a bad one is refused naming where it came from.
#[test]
fn serve_training_configuration_comes_from_flag_env_file_or_built_in() {
    let s = Sandbox::new("serve-config");
    std::fs::write(s.work().join("rank0.toml"), "rank = 0\n").unwrap();
    std::fs::write(s.work().join("steps0.toml"), "steps = 0\n").unwrap();
    std::fs::create_dir_all(s.config_file().parent().unwrap()).unwrap();
    std::fs::write(
        s.config_file(),
        format!("train_config = {:?}\n", s.work().join("rank0.toml")),
    )
    .unwrap();
    let out = s.run(&["serve", "--bind", "127.0.0.1:0"], "", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("`train_config` in"),
        "{}",
        text(&out.stderr)
    );
    let out = s.run(
        &["serve", "--bind", "127.0.0.1:0"],
        "",
        &[("TRIAGE_TRAIN_CONFIG", "steps0.toml")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("steps0.toml"), "{}", text(&out.stderr));
    let out = s.run(
        &["serve", "--bind", "127.0.0.1:0", "--train-config", "nope.toml"],
        "",
        &[("TRIAGE_TRAIN_CONFIG", "steps0.toml")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nope.toml"),
        "the flag wins: {}",
        text(&out.stderr)
    );
}

/// `train` reads its configuration as `serve` does: `--config`, else `TRIAGE_TRAIN_CONFIG`,
/// else `train_config` in the user config file, else the built-in `configs/train.toml`
/// (adapter on the top 8 layers, dense f16 copies), which `--dry-run` shows.
/// Needs the 0.5B model in the default cache (`triage model pull 0.5b`; CI does it first).
#[test]
fn train_configuration_comes_from_flag_env_file_or_built_in() {
    let s = Sandbox::new("train-config");
    let out = s.run(
        &["data", "synth", "--n", "20", "--seed", "1", "-o", "d.jsonl"],
        "",
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for k in [2, 4, 6] {
        std::fs::write(
            s.work().join(format!("top{k}.toml")),
            format!("top_layers = {k}\n"),
        )
        .unwrap();
    }
    let dry = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--model", "0.5b", "train", "--data", "d.jsonl", "--dry-run"];
        args.extend_from_slice(extra);
        let out = s.run(&args, "", env);
        assert!(out.status.success(), "{extra:?} {env:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let built_in = dry(&[], &[]);
    assert!(
        built_in.contains("the top 8 layers") && built_in.contains("dense f16 weight copies"),
        "{built_in}"
    );
    std::fs::create_dir_all(s.config_file().parent().unwrap()).unwrap();
    std::fs::write(
        s.config_file(),
        format!("train_config = {:?}\n", s.work().join("top4.toml")),
    )
    .unwrap();
    let file = dry(&[], &[]);
    assert!(file.contains("the top 4 layers"), "{file}");
    let env = dry(&[], &[("TRIAGE_TRAIN_CONFIG", "top2.toml")]);
    assert!(env.contains("the top 2 layers"), "{env}");
    let flag = dry(
        &["--config", "top6.toml"],
        &[("TRIAGE_TRAIN_CONFIG", "top2.toml")],
    );
    assert!(flag.contains("the top 6 layers"), "the flag wins: {flag}");
    // Flags override the file's keys.
    let over = dry(&["--top-layers", "3"], &[]);
    assert!(over.contains("the top 3 layers"), "{over}");
}

/// `triage serve` from an empty folder with the built-in defaults answers /healthz.
/// Needs the 0.5B model in the default cache (`triage model pull 0.5b`; CI does it first).
#[test]
fn serve_from_an_empty_folder_answers_healthz() {
    let s = Sandbox::new("serve");
    let mut child = s
        .command(&[
            "--model",
            "0.5b",
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--no-adapter",
            "--memory-limit",
            "off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("serve ended before listening: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = stderr.read_to_string(&mut sink);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let response = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut c = TcpStream::connect(&addr)?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                c,
                "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut r = String::new();
            c.read_to_string(&mut r)?;
            Ok(r)
        })();
        match attempt {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("no answer from {addr}: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        std::fs::read_dir(s.work())
            .unwrap()
            .all(|e| e.unwrap().file_name() == "serve-data"),
        "nothing but the data folder is written to the working folder"
    );
}
