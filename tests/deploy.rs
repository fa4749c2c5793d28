//! The Kubernetes manifests in `deploy/kubernetes/` (issue 23) against the
//! Kubernetes OpenAPI schemas and against the gateway itself: every document
//! passes `kubernetes-validate --strict` (pinned in
//! `tests/kubernetes/requirements.txt`, installed by
//! `tests/kubernetes/install.sh`; without it these tests fail, never skip),
//! the ConfigMap's `countersign.yaml` passes `countersign check` with exactly
//! the environment the Deployment gives it, and the real binary, started with
//! the container's arguments on that configuration, serves the probes' paths
//! on the port they name and stops well within the grace period.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use support::process::{TestDatabase, BIN};
use support::*;

const DIR: &str = "deploy/kubernetes";
const VALIDATOR: &str = "tests/kubernetes/.venv/bin/kubernetes-validate";

/// Every document of every `*.yaml` file in `deploy/kubernetes/`.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path(DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

/// The one manifest of `kind`.
fn one(docs: &[(PathBuf, Value)], kind: &str) -> Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in {DIR}");
    found[0].clone()
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value:?}"))
}

/// Runs the schema checker on `files`: Ok only when it exits 0 and says
/// "passed" for each of the `documents` and warns about nothing (it only
/// warns, exit 0, about a kind it has no schema for).
fn validate(files: &[PathBuf], documents: usize) -> Result<String, String> {
    let validator = repo_path(VALIDATOR);
    let output = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run tests/kubernetes/install.sh (README, \"Run the tests\"; \
                 .ci/run does)",
                validator.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let passed = text.matches(" passed for resource ").count();
    if output.status.success()
        && passed == documents
        && !text.contains("WARN")
        && !text.contains("ERROR")
    {
        Ok(text)
    } else {
        Err(format!(
            "{} ({passed} of {documents} passed):\n{text}",
            output.status
        ))
    }
}

#[test]
fn manifests_pass_the_kubernetes_openapi_schemas_and_a_broken_one_does_not() {
    let docs = manifests();
    let mut files: Vec<PathBuf> = docs.iter().map(|(f, _)| f.clone()).collect();
    files.dedup();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap_or("?"))
        .collect();
    for kind in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget"] {
        assert!(kinds.contains(&kind), "no {kind} in {DIR}: {kinds:?}");
    }
    assert!(
        !kinds.contains(&"Secret"),
        "secrets are referenced, never written in {DIR}"
    );
    if let Err(e) = validate(&files, docs.len()) {
        panic!("{DIR} does not pass kubernetes-validate --strict: {e}");
    }

    // The checker fails on what a cluster would refuse: a wrong type, a
    // misspelt field, a kind that does not exist.
    let dir = tempfile::tempdir().unwrap();
    for (file, from, to) in [
        ("deployment.yaml", "replicas: 2", "replicas: two"),
        ("deployment.yaml", "periodSeconds: 10", "periodSecond: 10"),
        (
            "deployment.yaml",
            "readOnlyRootFilesystem:",
            "readOnlyRootFileSystem:",
        ),
        ("service.yaml", "kind: Service", "kind: Servic"),
        (
            "poddisruptionbudget.yaml",
            "minAvailable: 1",
            "minAvailable: [1]",
        ),
    ] {
        let text = std::fs::read_to_string(repo_path(DIR).join(file)).unwrap();
        assert!(text.contains(from), "{file} no longer has {from:?}");
        let broken = dir.path().join(file);
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        assert!(
            validate(&[broken], 1).is_err(),
            "kubernetes-validate accepted {file} with {from:?} changed to {to:?}"
        );
    }
}

/// The pod template's one container.
fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The ConfigMap's files where the container sees them: its mount path, and
/// a temporary directory laid out as the kubelet lays out a ConfigMap
/// volume: each key a symlink through `..data` to a directory of the files,
/// and an update a new directory swapped in by renaming `..data`.
struct MountedConfig {
    mount_path: String,
    dir: tempfile::TempDir,
    files: BTreeMap<String, String>,
    version: u32,
}

impl MountedConfig {
    fn new(deployment: &Value, config_map: &Value) -> Self {
        let name = str_of(&config_map["metadata"]["name"], "ConfigMap name");
        let volume = deployment["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["configMap"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume of the ConfigMap {name}"));
        assert!(
            volume["configMap"]["items"].is_null(),
            "the test mounts every key: teach it `items`"
        );
        let volume_name = str_of(&volume["name"], "volume name");
        let mount = container(deployment)["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"].as_str() == Some(volume_name))
            .unwrap_or_else(|| panic!("volume {volume_name} is not mounted"));
        let files = config_map["data"]
            .as_mapping()
            .expect("data")
            .iter()
            .map(|(k, v)| {
                (
                    str_of(k, "data key").to_owned(),
                    str_of(v, "data").to_owned(),
                )
            })
            .collect();
        let mut mounted = Self {
            mount_path: str_of(&mount["mountPath"], "mountPath")
                .trim_end_matches('/')
                .to_owned(),
            dir: tempfile::tempdir().unwrap(),
            files,
            version: 0,
        };
        mounted.publish();
        for key in mounted.files.keys() {
            std::os::unix::fs::symlink(format!("..data/{key}"), mounted.dir.path().join(key))
                .unwrap();
        }
        mounted
    }

    /// Writes the files into a new `..N` directory and points `..data` at it
    /// in one rename, as the kubelet does when the ConfigMap changes.
    fn publish(&mut self) {
        self.version += 1;
        let root = self.dir.path();
        let version = format!("..{}", self.version);
        std::fs::create_dir(root.join(&version)).unwrap();
        for (key, text) in &self.files {
            std::fs::write(root.join(&version).join(key), text).unwrap();
        }
        std::os::unix::fs::symlink(&version, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        if self.version > 1 {
            std::fs::remove_dir_all(root.join(format!("..{}", self.version - 1))).unwrap();
        }
    }

    /// Changes one key of the ConfigMap, as `kubectl apply` and the kubelet do.
    fn update(&mut self, key: &str, text: String) {
        assert!(self.files.contains_key(key), "no key {key}");
        self.files.insert(key.to_owned(), text);
        self.publish();
    }

    /// Where a path inside the container is here; it must be in the mount.
    fn local(&self, in_container: &str) -> PathBuf {
        let relative = in_container
            .strip_prefix(&format!("{}/", self.mount_path))
            .unwrap_or_else(|| {
                panic!(
                    "{in_container} is not in the ConfigMap's mount {}",
                    self.mount_path
                )
            });
        let path = self.dir.path().join(relative);
        assert!(
            path.exists(),
            "{in_container}: the ConfigMap has no key {relative}"
        );
        path
    }
}

/// The container's arguments with `--config` pointing at `mounted`'s copy,
/// and the configuration file in the container.
fn args(deployment: &Value, mounted: &MountedConfig) -> (Vec<String>, PathBuf) {
    let container = container(deployment);
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .map(|c| str_of(c, "command"))
        .collect();
    assert_eq!(command.len(), 1, "{command:?}");
    assert!(
        Path::new(command[0])
            .file_name()
            .is_some_and(|n| n == "countersign"),
        "the container runs {command:?}, not the countersign binary"
    );
    let mut args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "args").to_owned())
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let at = args
        .iter()
        .position(|a| a == "--config" || a == "-c")
        .unwrap_or_else(|| panic!("no --config in {args:?}"));
    let config = mounted.local(&args[at + 1]);
    args[at + 1] = config.display().to_string();
    (args, config)
}

/// The environment the Deployment gives the container: literal values as
/// they are, and `secret_values` for each Secret key it references.
fn environment(deployment: &Value, secret_values: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container(deployment)["env"].as_sequence().expect("env") {
        let name = str_of(&var["name"], "env name").to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            for word in ["SECRET", "PASSWORD", "TOKEN", "DATABASE_URL", "KEY"] {
                assert!(
                    !name.contains(word),
                    "{name} is given inline: take it from a Secret (secretKeyRef)"
                );
            }
            value.to_owned()
        } else {
            let reference = &var["valueFrom"]["secretKeyRef"];
            let key = str_of(&reference["key"], "secretKeyRef.key");
            assert!(reference["name"].is_string(), "{name}: secretKeyRef.name");
            secret_values
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap_or_else(|| panic!("{name}: Secret key {key}: give the test a value"))
                .1
                .to_owned()
        };
        env.insert(name, value);
    }
    env
}

/// The names of the variables set from a Secret.
fn secret_variables(deployment: &Value) -> Vec<String> {
    container(deployment)["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter(|v| !v["valueFrom"]["secretKeyRef"].is_null())
        .map(|v| str_of(&v["name"], "env name").to_owned())
        .collect()
}

const CHECK_SECRETS: [(&str, &str); 2] = [
    ("ciba-client-secret", "not-the-real-secret"),
    (
        "database-url",
        "postgres://countersign:not-the-real-password@postgres.example:5432/countersign",
    ),
];

#[test]
fn the_configmaps_countersign_yaml_passes_countersign_check_with_the_deployments_env() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment");
    let mounted = MountedConfig::new(&deployment, &one(&docs, "ConfigMap"));
    let (_, config) = args(&deployment, &mounted);
    let env = environment(&deployment, &CHECK_SECRETS);
    // Nothing from this process's environment: a `${VAR}` the Deployment
    // does not set fails here as it would in the pod.
    let output = Command::new(BIN)
        .args(["check", "--production", "--config"])
        .arg(&config)
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "countersign check refused the ConfigMap's countersign.yaml:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(
        stdout.contains("buy-product"),
        "the policy is loaded: {stdout}"
    );

    // The client secret and the database URL come from the Secret.
    let text = std::fs::read_to_string(&config).unwrap();
    let parsed: Value = serde_yaml::from_str(&text).unwrap();
    let from_secret = secret_variables(&deployment);
    for (what, value) in [
        (
            "authorization_server.client_auth.client_secret",
            &parsed["authorization_server"]["client_auth"]["client_secret"],
        ),
        ("store.postgres", &parsed["store"]["postgres"]),
    ] {
        let value = str_of(value, what);
        let variable = value
            .strip_prefix("${")
            .and_then(|v| v.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{what} is written in the ConfigMap: use ${{VAR}}"));
        assert!(
            from_secret.iter().any(|v| v == variable),
            "{what}: {variable} is not set from a Secret"
        );
    }
}

/// `ADDR:PORT` of the configuration's `listen.<which>`.
fn listen(config: &Value, which: &str) -> SocketAddr {
    str_of(&config["listen"][which], which)
        .parse()
        .unwrap_or_else(|e| panic!("listen.{which}: {e}"))
}

/// `10s`, `1m`: the configuration's durations, as far as these files use them.
fn seconds(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.len() - 1);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("duration {text}"));
    match unit {
        "s" => number,
        "m" => number * 60,
        _ => panic!("duration {text}"),
    }
}

fn int(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {value:?}"))
}

/// A container port by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return number as u16;
    }
    let name = str_of(port, "port");
    let found = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    int(&found["containerPort"], name) as u16
}

fn labels_match(selector: &Value, labels: &Value, what: &str) {
    let selector = selector.as_mapping().expect("a selector");
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "{what}: the pods lack {key:?}");
    }
}

#[test]
fn replicas_security_grace_period_service_and_budget_fit_the_gateway() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment");
    let service = one(&docs, "Service");
    let budget = one(&docs, "PodDisruptionBudget");
    let config_map = one(&docs, "ConfigMap");
    let mounted = MountedConfig::new(&deployment, &config_map);
    let (_, file) = args(&deployment, &mounted);
    let config: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let container = container(&deployment);

    // Two replicas need the shared store.
    assert_eq!(int(&spec["replicas"], "replicas"), 2);
    assert!(
        config["store"]["postgres"].is_string(),
        "replicas share approvals only in PostgreSQL: {:?}",
        config["store"]
    );

    // Non-root, read-only.
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(int(&pod["securityContext"]["runAsUser"], "runAsUser") > 0);
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));

    // The grace period outlasts what SIGTERM may take (docs/durable-approvals.md, "Shutdown"):
    // the preStop wait, store.drain_timeout for forwards in flight, then up
    // to 6 s for passing calls (drain.rs: 0.2 s, pingora: 1 s + 5 s).
    let grace = int(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let drain = config["store"]["drain_timeout"]
        .as_str()
        .map_or(10, seconds);
    assert!(
        grace > pre_stop + drain + 6,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain_timeout {drain} + 6"
    );
    // Start-up waits for discovery up to startup_wait before it serves the
    // admin listener: the startup probe must allow for it.
    let startup = &container["startupProbe"];
    let startup_wait = config["authorization_server"]["startup_wait"]
        .as_str()
        .map_or(60, seconds);
    assert!(
        int(&startup["periodSeconds"], "startupProbe.periodSeconds")
            * int(
                &startup["failureThreshold"],
                "startupProbe.failureThreshold"
            )
            > startup_wait,
        "the startup probe gives up before authorization_server.startup_wait ({startup_wait} s)"
    );

    // The Service reaches the proxy and never the admin listener; it, the
    // Deployment and the budget select these pods.
    let proxy = listen(&config, "proxy");
    let admin = listen(&config, "admin");
    for port in service["spec"]["ports"].as_sequence().expect("ports") {
        assert_eq!(
            container_port(container, &port["targetPort"]),
            proxy.port(),
            "the Service sends agents somewhere else than listen.proxy"
        );
    }
    let labels = &spec["template"]["metadata"]["labels"];
    labels_match(&service["spec"]["selector"], labels, "Service");
    labels_match(&spec["selector"]["matchLabels"], labels, "Deployment");
    labels_match(
        &budget["spec"]["selector"]["matchLabels"],
        labels,
        "PodDisruptionBudget",
    );
    assert!(
        int(&budget["spec"]["minAvailable"], "minAvailable") < 2,
        "a budget that allows no eviction blocks node drains"
    );

    // The kubelet probes the pod's IP: the listeners must not be loopback.
    for (which, addr) in [("proxy", proxy), ("admin", admin)] {
        assert!(
            addr.ip().is_unspecified(),
            "listen.{which} {addr}: the kubelet and the Service reach the pod's IP"
        );
    }
}

#[tokio::test]
async fn the_binary_started_with_the_containers_args_serves_the_probes_and_stops_in_time() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment");
    let mounted = MountedConfig::new(&deployment, &one(&docs, "ConfigMap"));
    let mut mounted = mounted;
    let (args, file) = args(&deployment, &mounted);
    let mut config: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let container = container(&deployment);
    let admin_port = listen(&config, "admin").port();

    // Each probe names the admin listener's port.
    let mut probes = Vec::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(
            container_port(container, &get["port"]),
            admin_port,
            "{probe} does not probe listen.admin"
        );
        probes.push((probe, str_of(&get["path"], probe).to_owned()));
    }
    let path = |name: &str| probes.iter().find(|(p, _)| *p == name).unwrap().1.clone();
    // Liveness never fails for a dependency (docs/operations.md,
    // "Liveness and readiness"); readiness does.
    assert_eq!(path("livenessProbe"), "/healthz");
    assert_eq!(path("startupProbe"), "/healthz");
    assert_eq!(path("readinessProbe"), "/readyz");

    // The same configuration, on loopback ports of this machine, with a
    // real authorization server and PostgreSQL for the Secret's values.
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config["listen"]["proxy"] = Value::from(proxy.to_string());
    config["listen"]["admin"] = Value::from(admin.to_string());
    let config_key = file.file_name().unwrap().to_str().unwrap().to_owned();
    mounted.update(&config_key, serde_yaml::to_string(&config).unwrap());
    let peer = Peer::start();
    let database = TestDatabase::create();
    let mut env = environment(
        &deployment,
        &[
            ("ciba-client-secret", "countersign-secret"),
            ("database-url", &database.url),
        ],
    );
    env.insert("CIBA_ISSUER".into(), peer.issuer.clone());
    env.insert("CIBA_CLIENT_ID".into(), "countersign-post".into());
    let log = mounted.dir.path().join("gateway.log");
    let mut child = Command::new(BIN)
        .args(&args)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // Every probe's path answers 200 once the gateway is ready.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http
            .get(format!("http://{admin}{}", path("readinessProbe")))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the gateway exited ({status}):\n{}", logs());
        }
        assert!(
            Instant::now() < deadline,
            "readiness probe not 200 within 30 s:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (probe, path) in &probes {
        let response = http
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{probe} {path}");
    }
    let readyz: serde_json::Value =
        flows::json_of(http.get(format!("http://{admin}/readyz"))).await;
    assert_eq!(readyz["checks"]["approval_store"], "ok", "{readyz}");

    // An edit of the policies, published as the kubelet publishes a
    // ConfigMap's change, is reloaded by the running gateway (configmap.yaml
    // says so).
    let policies = config["policies"][0]
        .as_str()
        .expect("a policy file")
        .to_owned();
    let edited = format!(
        "{}  - name: cancel-order\n    match: {{ methods: [DELETE], path: \"/orders/{{orderId}}\" }}\n    \
         require: {{ scopes: [product:buy], audience: https://shop.example/api }}\n    \
         binding_message: \"Cancel order {{{{params.orderId}}}}\"\n",
        mounted.files[&policies]
    );
    mounted.update(&policies, edited);
    let reloaded = r#"countersign_config_reload_total{result="ok"} 1"#;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = flows::text_of(http.get(format!("http://{admin}/metrics"))).await;
        if metrics.contains(reloaded) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the edited ConfigMap was not reloaded within 15 s:\n{}\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("countersign_config_reload_total"))
                .collect::<Vec<_>>()
                .join("\n"),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM, as the kubelet sends after preStop: the gateway exits 0
    // well inside what the grace period leaves it.
    let grace = int(
        &deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    let signal = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signal.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(grace - pre_stop) {
            let _ = child.kill();
            panic!(
                "still running {} s after SIGTERM: the kubelet would SIGKILL it\n{}",
                grace - pre_stop,
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status}:\n{}", logs());
}
