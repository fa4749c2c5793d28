//! The container image (issue 23): `Containerfile` built with podman on a
//! runtime base made here from Debian's packages (`deploy/image/local-base.sh`,
//! mmdebstrap: no image registry is needed), with this test's own binary
//! (`--target prebuilt`), and run with runc on the host network:
//!
//! - `countersign dev` in the container completes an approval end to end (the
//!   call held, approved on the approver page's API, the shop's order
//!   answered), as a non-root user, with `/healthz` and `/readyz` answering;
//! - the image's default command, `countersign run` on the configuration
//!   mounted at `/etc/countersign`, holds and forwards a call approved at that
//!   development server and keeps the approval in SQLite on a named volume at
//!   `/var/lib/countersign`, where a later container reads it back.
//!
//! Without podman, runc or mmdebstrap these tests fail, never skip (.ci/run
//! installs them). The images, containers and volumes made are removed; the
//! runtime base is kept as a cache (the script rebuilds it when it changes).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::process::{approve_dev_pending, dev_mode_text, BIN};
use support::*;

const INSTALL: &str = "apt-get install podman runc mmdebstrap (.ci/run installs them)";

/// What every container here runs with: runc, explicit limits (this VM's
/// defaults are refused by runc), the host's network (the test reaches the
/// container's ephemeral ports on 127.0.0.1 and the container reaches the
/// dev server of another one).
const RUN_FLAGS: &[&str] = &[
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
    "--network=host",
];

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("podman cannot be run ({e}): {INSTALL}"))
}

/// `podman ARGS`, which must succeed; its stdout.
fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(
        output.status.success(),
        "podman {}: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn unique(what: &str) -> String {
    format!(
        "countersign-test-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// An image built from `Containerfile` with this test's binary; removed on
/// drop (with the intermediate images of its build).
struct Image(String);

impl Image {
    fn build() -> Self {
        let script = repo_path("deploy/image/local-base.sh");
        let output = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{} cannot be run: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}); it needs podman and mmdebstrap: {INSTALL}\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let base = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(base.starts_with("localhost/"), "{base}");

        // The build context of `--target prebuilt`: the binary alone.
        let context = tempfile::tempdir().unwrap();
        std::fs::copy(BIN, context.path().join("countersign")).unwrap();
        let name = format!("localhost/{}:test", unique("image"));
        let containerfile = repo_path("Containerfile");
        let context_dir = context.path().to_str().unwrap();
        // Not `--layers=false`: podman 4.3 then deletes the base image along
        // with the build's intermediate images.
        podman_ok(&[
            "build",
            "--quiet",
            "--runtime=runc",
            "--target=prebuilt",
            &format!("--build-arg=RUNTIME_IMAGE={base}"),
            "--file",
            containerfile.to_str().unwrap(),
            "--tag",
            &name,
            context_dir,
        ]);
        Image(name)
    }

    fn config(&self) -> Value {
        let text = podman_ok(&["image", "inspect", &self.0]);
        let all: Value = serde_json::from_str(&text).unwrap();
        all[0]["Config"].clone()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "--force", &self.0]);
    }
}

/// A container run in the foreground by `podman run --name`, its stderr in a
/// log file; removed (killed) on drop.
struct Container {
    name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Container {
    fn run(image: &Image, options: &[&str], args: &[&str]) -> Self {
        let name = unique("container");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new("podman")
            .args(["run", "--rm", "--name", &name])
            .args(RUN_FLAGS)
            .args(options)
            .arg(&image.0)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("podman cannot be run ({e}): {INSTALL}"));
        Container {
            name,
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The uid, effective uid, saved and filesystem uid of the container's
    /// first process, as the host's kernel has them (`Uid:` of
    /// /proc/PID/status; rootful podman maps no user).
    fn uids(&self) -> String {
        let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `podman stop` (SIGTERM, then SIGKILL after `grace`); how the
    /// container's process exited.
    fn stop(&mut self, grace: Duration) -> std::process::ExitStatus {
        podman_ok(&["stop", "--time", &grace.as_secs().to_string(), &self.name]);
        self.child.wait().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--volumes", "--time=0", &self.name]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = podman(&["volume", "rm", "--force", &self.0]);
    }
}

/// The first word after `label` on the line of `printed` starting with it.
fn printed_after(printed: &str, label: &str) -> String {
    printed
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} in:\n{printed}"))
        .to_owned()
}

/// GET `url` until it answers (up to 20 s); its status.
async fn status_of(url: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match reqwest::get(url).await {
            Ok(response) => return response.status().as_u16(),
            Err(e) if Instant::now() > deadline => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until `port` on 127.0.0.1 accepts connections.
async fn wait_listening(port: u16, container: &Container) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} after 30 s:\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// alice buys 2 XYZ phones through `gateway`; the call is held until her
/// approval at the development server `issuer`, then answered with the
/// shop's order.
async fn buy_approved(gateway: &str, issuer: &str) {
    let call = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{gateway}/shop"))
            .header(USER_HEADER, "alice")
            .json(&json!({"product": "XYZ phone", "qty": 2, "priceLimit": 900}))
            .send(),
    );
    approve_dev_pending(issuer, "alice").await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["product"], "XYZ phone", "{order}");
    assert_eq!(order["qty"], 2, "{order}");
}

/// The configuration a user mounts at /etc/countersign: the shop's policies
/// in front of the dev container's shop, approved at its authorization
/// server, approvals in SQLite on the volume. Readable by the image's user.
fn mounted_config(dir: &Path, issuer: &str, shop: &str, proxy: u16, admin: u16) {
    let shop = shop.trim_start_matches("http://");
    std::fs::write(
        dir.join("countersign.yaml"),
        format!(
            r#"listen: {{ proxy: "127.0.0.1:{proxy}", admin: "127.0.0.1:{admin}" }}
upstreams:
  shop: {{ url: "http://{shop}" }}
authorization_server:
  issuer: "{issuer}"
  {DEV_CLIENT_POST}
  login_hint: iss_sub
  audience_parameter: audience
identity: {{ header: {{ name: {USER_HEADER} }} }}
policies: [shop.yaml]
default_action: pass
store: {{ sqlite: /var/lib/countersign/approvals.db }}
"#
        ),
    )
    .unwrap();
    std::fs::copy(repo_path("policies/shop.yaml"), dir.join("shop.yaml")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (dir.to_path_buf(), 0o755),
        (dir.join("countersign.yaml"), 0o644),
        (dir.join("shop.yaml"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_dev_mode_and_the_default_run_command_as_a_non_root_user() {
    let image = Image::build();

    // What the Containerfile promises a user of the image.
    let config = image.config();
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/local/bin/countersign"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        json!(["run", "--config", "/etc/countersign/countersign.yaml"]),
        "{config}"
    );
    for volume in ["/etc/countersign", "/var/lib/countersign"] {
        assert!(config["Volumes"].get(volume).is_some(), "{config}");
    }
    for port in ["8080/tcp", "9090/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "{config}");
    }

    // `countersign dev` in the container: an approval end to end.
    let mut dev = Container::run(
        &image,
        &[],
        &[
            "dev",
            "--port=0",
            "--authz-port=0",
            "--shop-port=0",
            "--interval=1",
        ],
    );
    let stdout = dev.child.stdout.take().unwrap();
    let printed = dev_mode_text(stdout, Duration::from_secs(60));
    let gateway = printed_after(&printed, "gateway (agents call this)");
    let issuer = printed_after(&printed, "dev authorization server");
    let shop = printed_after(&printed, "example shop API behind it");
    let metrics = printed_after(&printed, "metrics (Prometheus)");
    let admin = metrics.strip_suffix("/metrics").expect("a metrics URL");
    assert_eq!(status_of(&format!("{admin}/healthz")).await, 200);
    assert_eq!(status_of(&format!("{admin}/readyz")).await, 200);
    assert_eq!(
        dev.uids(),
        "65532 65532 65532 65532",
        "not the image's user"
    );
    buy_approved(&gateway, &issuer).await;

    // The default command on a mounted configuration, SQLite on a volume.
    let config_dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    mounted_config(config_dir.path(), &issuer, &shop, proxy, admin);
    let volume = Volume(unique("state"));
    podman_ok(&["volume", "create", &volume.0]);
    let mounts = [
        format!(
            "--volume={}:/etc/countersign:ro",
            config_dir.path().display()
        ),
        format!("--volume={}:/var/lib/countersign", volume.0),
    ];
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let mut run = Container::run(&image, &mounts, &[]);
    wait_listening(proxy, &run).await;
    assert_eq!(
        status_of(&format!("http://127.0.0.1:{admin}/readyz")).await,
        200
    );
    assert_eq!(run.uids(), "65532 65532 65532 65532");
    buy_approved(&format!("http://127.0.0.1:{proxy}"), &issuer).await;
    let status = run.stop(Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: {status}\n{}", run.logs());

    // The approval outlives the container, on the volume, owned by the
    // image's user.
    let mountpoint = podman_ok(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &volume.0,
    ]);
    let db = Path::new(mountpoint.trim()).join("approvals.db");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    assert_eq!(meta.uid(), 65532, "{}", db.display());
    let mut list = Container::run(
        &image,
        &mounts,
        &[
            "approvals",
            "list",
            "--config",
            "/etc/countersign/countersign.yaml",
        ],
    );
    let mut listed = String::new();
    std::io::Read::read_to_string(&mut list.child.stdout.take().unwrap(), &mut listed).unwrap();
    assert!(list.child.wait().unwrap().success(), "{}", list.logs());
    assert!(
        listed.contains("alice") && listed.contains("done"),
        "{listed}"
    );
}
