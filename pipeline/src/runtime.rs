//! The keys that say how an agent runs a job: `image:`, `services:`, `checkout:` and
//! `reports:`, and a job's `environment:`, `concurrency:` and `outputs:`.
//!
//! Loading with positions only: the types are protocol's (what agents get) or the
//! model's. References inside these texts are checked by `jobs` with the rest of the
//! job, since only then are its steps, needs and the other jobs' outputs known.

use gantry_protocol::limits::{MAX_JOB_OUTPUTS, MAX_OUTPUT_NAME_LEN};
use gantry_protocol::{
    Checkout, CheckoutSpec, HealthCommand, Image, PortProtocol, PullPolicy, RegistryCredentials,
    Reports, Service, ServiceHealth, ServicePort,
};

use crate::deploy::environment_name_problem;
use crate::inputs::InputType;
use crate::load::{
    boolean, entries, env_map, fields, keyed_texts, parse_duration, scalar, string, string_list,
    Ctx, Text,
};
use crate::model::{Concurrency, JobEnvironment};
use crate::outputs::{path_problem, MAX_OUTPUT_PATHS};
use crate::refs::{parse_reference, sole_reference, Reference};
use crate::yaml::{Kind, Node, Pos};

pub use gantry_protocol::limits::{MAX_SERVICES, MAX_SERVICE_PORTS};
/// Most arguments of a service's command or health command.
pub const MAX_COMMAND_ARGS: usize = 64;
/// Deepest `checkout.depth` short of `full`.
pub const MAX_CHECKOUT_DEPTH: u32 = 1_000_000;
/// Longest concurrency group, as written.
pub const MAX_GROUP_LEN: usize = 256;
/// Longest image reference and environment URL.
pub const MAX_IMAGE_LEN: usize = 512;
pub const MAX_URL_LEN: usize = 2048;

const IMAGE_KEYS: &[&str] = &["name", "pull", "credentials"];
const CREDENTIAL_KEYS: &[&str] = &["username", "password"];
const SERVICE_KEYS: &[&str] = &["image", "env", "ports", "command", "health"];
const SERVICE_HEALTH_KEYS: &[&str] = &["cmd", "interval", "retries", "start-period", "timeout"];
const CHECKOUT_KEYS: &[&str] = &["depth", "submodules", "path"];
const REPORT_KEYS: &[&str] = &["junit", "coverage"];
const ENVIRONMENT_KEYS: &[&str] = &["name", "url"];
const CONCURRENCY_KEYS: &[&str] = &["group", "cancel-in-progress"];

/// Service health defaults: check every 2 s, give up after 30 failures (a minute), no
/// start period, 5 s per check.
const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
const DEFAULT_HEALTH_RETRIES: u32 = 30;
const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 5_000;

/// Why an image reference is refused; `None` if fine. A reference still holding
/// `${{ }}` is checked when it is filled in.
pub fn image_name_problem(name: &str) -> Option<String> {
    if name.contains("${{") {
        return None;
    }
    if name.is_empty() || name.len() > MAX_IMAGE_LEN {
        return Some(format!("must be 1 to {MAX_IMAGE_LEN} bytes"));
    }
    let (rest, digest) = match name.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (name, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some("has a digest that is not @sha256: and 64 hex digits".to_owned());
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = (1..=128).contains(&tag.len())
            && !tag.starts_with(['.', '-'])
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Some(format!(
                "has tag \"{tag}\"; a tag is 1 to 128 of A-Z a-z 0-9 _ . -"
            ));
        }
    }
    let parts: Vec<&str> = repository.split('/').collect();
    // A first part with a dot, a port or "localhost" is a registry's host.
    let has_host = parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost");
    for (i, part) in parts.iter().enumerate() {
        let ok = if i == 0 && has_host {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        } else {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        };
        if !ok {
            return Some(format!("has \"{part}\"; repository names are lower-case letters, digits, . _ and -, between /"));
        }
    }
    None
}

/// `image:` of a job or a service: a reference, or `{ name, pull, credentials }`.
pub(crate) fn load_image(ctx: &mut Ctx, node: &Node, what: &str) -> Option<Image> {
    let (name, name_pos, pull, credentials) = if let Kind::Scalar { .. } = &node.kind {
        (
            string(ctx, node, what)?,
            node.pos,
            PullPolicy::default(),
            None,
        )
    } else {
        let f = fields(ctx, node, IMAGE_KEYS, what)?;
        let Some(name_node) = f.get("name") else {
            ctx.error(
                node.pos,
                format!("{what} needs name: the image reference, like postgres:16"),
            );
            return None;
        };
        let name = string(ctx, name_node, &format!("{what}.name"))?;
        let pull = match f.get("pull").map(|n| (scalar(n), n.pos)) {
            None => PullPolicy::default(),
            Some((Some("never"), _)) => PullPolicy::Never,
            Some((Some("if-not-present"), _)) => PullPolicy::IfNotPresent,
            Some((Some("always"), _)) => PullPolicy::Always,
            Some((_, pos)) => {
                ctx.error(
                    pos,
                    format!("{what}.pull must be never, if-not-present or always"),
                );
                PullPolicy::default()
            }
        };
        let credentials = match f.get("credentials") {
            None => None,
            Some(n) => Some(load_credentials(ctx, n, what)?),
        };
        (name, name_node.pos, pull, credentials)
    };
    if let Some(problem) = image_name_problem(&name) {
        ctx.error(name_pos, format!("image \"{name}\" {problem}"));
        return None;
    }
    Some(Image {
        name,
        pull,
        credentials,
    })
}

fn load_credentials(ctx: &mut Ctx, node: &Node, what: &str) -> Option<RegistryCredentials> {
    let what = format!("{what}.credentials");
    let f = fields(ctx, node, CREDENTIAL_KEYS, &what)?;
    let (Some(user_node), Some(password_node)) = (f.get("username"), f.get("password")) else {
        ctx.error(
            node.pos,
            format!("{what} needs username and password: ${{{{ secrets.NAME }}}}"),
        );
        return None;
    };
    let username = string(ctx, user_node, &format!("{what}.username"))?;
    let password = string(ctx, password_node, &format!("{what}.password"))?;
    let Some(Ok(Reference::Secret(name))) = sole_reference(&password).map(parse_reference) else {
        ctx.error(
            password_node.pos,
            format!("{what}.password must be ${{{{ secrets.NAME }}}} and nothing else: a password is never written in a pipeline file (store it with gantry secrets set NAME)"),
        );
        return None;
    };
    Some(RegistryCredentials {
        username,
        password_secret: name,
    })
}

/// A DNS label: 1 to 63 of a-z, 0-9 and -, not starting or ending with -.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `services:`: name to `{ image, env, ports, command, health }`, or name to an image.
pub(crate) fn load_services(ctx: &mut Ctx, node: &Node) -> Vec<Service> {
    let listed = entries(ctx, node, "services");
    if listed.len() > MAX_SERVICES {
        ctx.error(
            node.pos,
            format!(
                "the job has {} services; the most is {MAX_SERVICES}",
                listed.len()
            ),
        );
        return Vec::new();
    }
    let mut services: Vec<Service> = Vec::new();
    let mut host_ports: Vec<(u16, PortProtocol, Pos)> = Vec::new();
    for (name, key, value) in listed {
        if !is_dns_label(&name) {
            ctx.error(
                key.pos,
                format!("service name \"{name}\" must be a DNS label (1 to 63 of a-z, 0-9 and -, not starting or ending with -): the job reaches the service by it"),
            );
            continue;
        }
        let what = format!("service {name}");
        if matches!(value.kind, Kind::Scalar { .. }) {
            if let Some(image) = load_image(ctx, value, &format!("{what}'s image")) {
                services.push(Service {
                    name,
                    image,
                    ..Service::default()
                });
            }
            continue;
        }
        let Some(f) = fields(ctx, value, SERVICE_KEYS, &what) else {
            continue;
        };
        let Some(image_node) = f.get("image") else {
            ctx.error(
                value.pos,
                format!("{what} needs image:, like image: postgres:16"),
            );
            continue;
        };
        let image = load_image(ctx, image_node, &format!("{what}'s image"));
        let env = f
            .get("env")
            .map(|n| env_map(ctx, n, &format!("{what}'s env")))
            .unwrap_or_default()
            .into_iter()
            .map(|(k, t)| (k, t.value))
            .collect();
        let mut ports: Vec<ServicePort> = Vec::new();
        if let Some(n) = f.get("ports") {
            let listed = string_list(ctx, n, &format!("{what}'s ports"));
            if listed.len() > MAX_SERVICE_PORTS {
                ctx.error(
                    n.pos,
                    format!(
                        "{what} publishes {} ports; the most is {MAX_SERVICE_PORTS}",
                        listed.len()
                    ),
                );
            }
            for (text, pos) in listed.into_iter().take(MAX_SERVICE_PORTS) {
                match parse_port(&text) {
                    Err(message) => ctx.error(pos, format!("{what}: {message}")),
                    Ok(port) => {
                        if ports
                            .iter()
                            .any(|p| p.container == port.container && p.protocol == port.protocol)
                        {
                            ctx.error(
                                pos,
                                format!("{what} publishes container port {} twice", port.container),
                            );
                            continue;
                        }
                        if let Some(host) = port.host {
                            if let Some((_, _, first)) = host_ports
                                .iter()
                                .find(|(h, p, _)| *h == host && *p == port.protocol)
                            {
                                ctx.error(pos, format!("loopback port {host} is published twice in the job (also at line {})", first.line));
                                continue;
                            }
                            host_ports.push((host, port.protocol, pos));
                        }
                        ports.push(port);
                    }
                }
            }
        }
        let command = f
            .get("command")
            .map(|n| load_command(ctx, n, &format!("{what}'s command")))
            .unwrap_or_default();
        let health = f
            .get("health")
            .and_then(|n| load_service_health(ctx, n, &what));
        if let Some(image) = image {
            services.push(Service {
                name,
                image,
                env,
                ports,
                command,
                health,
            });
        }
    }
    services
}

/// `5432`, `15432:5432`, `5432/udp`: a container port, optionally the loopback port to
/// publish it on, optionally the protocol.
pub fn parse_port(text: &str) -> Result<ServicePort, String> {
    let bad = || {
        format!("port \"{text}\" must be CONTAINER, HOST:CONTAINER or either with /tcp or /udp, with ports from 1 to 65535")
    };
    let (ports, protocol) = match text.trim().rsplit_once('/') {
        Some((ports, "tcp")) => (ports, PortProtocol::Tcp),
        Some((ports, "udp")) => (ports, PortProtocol::Udp),
        Some(_) => return Err(bad()),
        None => (text.trim(), PortProtocol::Tcp),
    };
    let number = |s: &str| s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
    let (host, container) = match ports.split_once(':') {
        Some((host, container)) => (Some(number(host)?), number(container)?),
        None => (None, number(ports)?),
    };
    Ok(ServicePort {
        container,
        host,
        protocol,
    })
}

/// A command: a list of arguments, or a string split on whitespace.
fn load_command(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<String> {
    let args: Vec<String> = match &node.kind {
        Kind::Seq(_) => string_list(ctx, node, what)
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        _ => string(ctx, node, what)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    if args.is_empty() {
        ctx.error(node.pos, format!("{what} is empty"));
    } else if args.len() > MAX_COMMAND_ARGS {
        ctx.error(
            node.pos,
            format!(
                "{what} has {} arguments; the most is {MAX_COMMAND_ARGS}",
                args.len()
            ),
        );
        return Vec::new();
    }
    args
}

fn load_service_health(ctx: &mut Ctx, node: &Node, service: &str) -> Option<ServiceHealth> {
    let what = format!("{service}'s health");
    let f = fields(ctx, node, SERVICE_HEALTH_KEYS, &what)?;
    let Some(cmd_node) = f.get("cmd") else {
        ctx.error(
            node.pos,
            format!("{what} needs cmd:, the check run in the container, like cmd: pg_isready"),
        );
        return None;
    };
    let cmd = match &cmd_node.kind {
        Kind::Seq(_) => HealthCommand::Exec(load_command(ctx, cmd_node, &format!("{what}.cmd"))),
        _ => HealthCommand::Shell(string(ctx, cmd_node, &format!("{what}.cmd"))?),
    };
    let duration = |ctx: &mut Ctx, key: &str, default: u64, min: u64, max: u64| -> u64 {
        let Some(n) = f.get(key) else {
            return default;
        };
        match scalar(n).map(parse_duration) {
            Some(Ok(ms)) if (min..=max).contains(&ms) => ms,
            Some(Ok(_)) => {
                ctx.error(
                    n.pos,
                    format!("{what}.{key} must be from {min} ms to {} s", max / 1000),
                );
                default
            }
            Some(Err(message)) => {
                ctx.error(n.pos, format!("{what}.{key} {message}"));
                default
            }
            None => {
                ctx.error(n.pos, format!("{what}.{key} must be a duration like 2s"));
                default
            }
        }
    };
    let interval_ms = duration(ctx, "interval", DEFAULT_HEALTH_INTERVAL_MS, 100, 600_000);
    let start_period_ms = duration(ctx, "start-period", 0, 0, 3_600_000);
    let timeout_ms = duration(ctx, "timeout", DEFAULT_HEALTH_TIMEOUT_MS, 100, 600_000);
    let retries = match f.get("retries") {
        None => DEFAULT_HEALTH_RETRIES,
        Some(n) => match scalar(n).and_then(|s| s.parse::<u32>().ok()) {
            Some(r) if (1..=1000).contains(&r) => r,
            _ => {
                ctx.error(
                    n.pos,
                    format!("{what}.retries must be a whole number from 1 to 1000"),
                );
                DEFAULT_HEALTH_RETRIES
            }
        },
    };
    Some(ServiceHealth {
        cmd,
        interval_ms,
        retries,
        start_period_ms,
        timeout_ms,
    })
}

/// `checkout: false`, `checkout: true` or `{ depth: N | full, submodules, path }`.
pub(crate) fn load_checkout(ctx: &mut Ctx, node: &Node) -> Option<Checkout> {
    if let Kind::Scalar { .. } = node.kind {
        return boolean(
            ctx,
            node,
            "checkout (false, true or { depth, submodules, path })",
        )
        .map(|on| {
            if on {
                Checkout::default()
            } else {
                Checkout::Skip
            }
        });
    }
    let f = fields(ctx, node, CHECKOUT_KEYS, "checkout")?;
    let mut spec = CheckoutSpec::default();
    if let Some(n) = f.get("depth") {
        match scalar(n) {
            Some("full") => spec.depth = None,
            other => match other.and_then(|s| s.parse::<u32>().ok()) {
                Some(depth) if (1..=MAX_CHECKOUT_DEPTH).contains(&depth) => {
                    spec.depth = Some(depth);
                }
                _ => ctx.error(n.pos, format!("checkout.depth must be full or a number of commits from 1 to {MAX_CHECKOUT_DEPTH}")),
            },
        }
    }
    if let Some(n) = f.get("submodules") {
        spec.submodules = boolean(ctx, n, "checkout.submodules").unwrap_or(false);
    }
    if let Some(n) = f.get("path") {
        let path = string(ctx, n, "checkout.path")?;
        if let Some(problem) = path_problem(&path) {
            ctx.error(n.pos, format!("checkout.path \"{path}\" {problem}"));
            return None;
        }
        spec.path = Some(path);
    }
    Some(Checkout::Source(spec))
}

/// `reports: { junit: [GLOBS], coverage: FILE }`.
pub(crate) fn load_reports(ctx: &mut Ctx, node: &Node) -> Option<Reports> {
    let f = fields(ctx, node, REPORT_KEYS, "reports")?;
    let mut reports = Reports::default();
    let mut ok = true;
    if let Some(n) = f.get("junit") {
        let globs = string_list(ctx, n, "reports.junit");
        if globs.len() > MAX_OUTPUT_PATHS {
            ctx.error(
                n.pos,
                format!(
                    "reports.junit lists {} paths; the most is {MAX_OUTPUT_PATHS}",
                    globs.len()
                ),
            );
            ok = false;
        }
        for (glob, pos) in globs {
            match path_problem(&glob) {
                Some(problem) => {
                    ctx.error(pos, format!("reports.junit path \"{glob}\" {problem}"));
                    ok = false;
                }
                None => reports.junit.push(glob),
            }
        }
    }
    if let Some(n) = f.get("coverage") {
        if let Some(path) = string(ctx, n, "reports.coverage") {
            match path_problem(&path) {
                Some(problem) => {
                    ctx.error(n.pos, format!("reports.coverage path \"{path}\" {problem}"));
                    ok = false;
                }
                None => reports.coverage = Some(path),
            }
        }
    }
    if reports.junit.is_empty() && reports.coverage.is_none() && ok {
        ctx.error(node.pos, "reports needs junit: [GLOBS] or coverage: FILE");
        return None;
    }
    ok.then_some(reports)
}

/// Checks an environment's name as a job gives it: a literal name, or exactly
/// `${{ inputs.NAME }}` of a `choice` input whose options are all environment names.
pub(crate) fn check_environment_name(ctx: &mut Ctx, name: &str, pos: Pos) -> bool {
    if !name.contains("${{") {
        return match environment_name_problem(name) {
            Some(problem) => {
                ctx.error(pos, format!("environment name \"{name}\" {problem}"));
                false
            }
            None => true,
        };
    }
    let Some(Ok(Reference::Input(input))) = sole_reference(name).map(parse_reference) else {
        ctx.error(pos, format!("environment \"{name}\" must be a name or exactly ${{{{ inputs.NAME }}}} of a choice input"));
        return false;
    };
    let Some(spec) = ctx.inputs.get(&input) else {
        // The reference check reports an undeclared input.
        return false;
    };
    if spec.kind != InputType::Choice {
        ctx.error(pos, format!("input \"{input}\" chooses an environment, so it must be type: choice with the environments as options"));
        return false;
    }
    let bad: Vec<String> = spec
        .options
        .iter()
        .filter(|o| environment_name_problem(o).is_some())
        .cloned()
        .collect();
    if !bad.is_empty() {
        ctx.error(pos, format!("input \"{input}\" chooses an environment, but its options {} are not environment names (1 to 63 of a-z 0-9 . _ -)", bad.join(", ")));
        return false;
    }
    true
}

/// `environment: NAME` or `{ name, url }`.
pub(crate) fn load_environment(ctx: &mut Ctx, node: &Node) -> Option<JobEnvironment> {
    let (name_node, url) = if let Kind::Scalar { .. } = &node.kind {
        (node, None)
    } else {
        let f = fields(ctx, node, ENVIRONMENT_KEYS, "environment")?;
        let Some(name_node) = f.get("name") else {
            ctx.error(
                node.pos,
                "environment needs name:, like { name: staging, url: https://staging.example.com }",
            );
            return None;
        };
        let url = match f.get("url") {
            None => None,
            Some(n) => {
                let url = string(ctx, n, "environment.url")?;
                let literal = !url.contains("${{");
                if url.len() > MAX_URL_LEN
                    || (literal && !(url.starts_with("https://") || url.starts_with("http://")))
                {
                    ctx.error(n.pos, format!("environment.url must be an http:// or https:// URL of at most {MAX_URL_LEN} bytes"));
                    return None;
                }
                Some(url)
            }
        };
        (name_node, url)
    };
    let name = string(ctx, name_node, "environment")?;
    check_environment_name(ctx, &name, name_node.pos).then_some(JobEnvironment { name, url })
}

/// `concurrency: GROUP` or `{ group, cancel-in-progress }`, with the group's position.
pub(crate) fn load_concurrency(ctx: &mut Ctx, node: &Node) -> Option<(Concurrency, Pos)> {
    let (group_node, cancel_in_progress) = if let Kind::Scalar { .. } = &node.kind {
        (node, false)
    } else {
        let f = fields(ctx, node, CONCURRENCY_KEYS, "concurrency")?;
        let Some(group_node) = f.get("group") else {
            ctx.error(
                node.pos,
                "concurrency needs group:, like group: deploy-${{ git.branch }}",
            );
            return None;
        };
        let cancel = f
            .get("cancel-in-progress")
            .and_then(|n| boolean(ctx, n, "concurrency.cancel-in-progress"))
            .unwrap_or(false);
        (group_node, cancel)
    };
    let group = string(ctx, group_node, "concurrency group")?;
    if group.trim().is_empty() || group.len() > MAX_GROUP_LEN {
        ctx.error(
            group_node.pos,
            format!("a concurrency group must be 1 to {MAX_GROUP_LEN} bytes"),
        );
        return None;
    }
    Some((
        Concurrency {
            group,
            cancel_in_progress,
        },
        group_node.pos,
    ))
}

/// An output name: letters, digits, `_` and `-`, starting with a letter or `_`.
pub fn is_output_name(name: &str) -> bool {
    gantry_protocol::is_output_name(name)
}

/// `outputs:`: name to a template.
pub(crate) fn load_outputs(ctx: &mut Ctx, node: &Node) -> Vec<(String, Text)> {
    let listed = entries(ctx, node, "outputs");
    if listed.len() > MAX_JOB_OUTPUTS {
        ctx.error(
            node.pos,
            format!(
                "the job declares {} outputs; the most is {MAX_JOB_OUTPUTS}",
                listed.len()
            ),
        );
        return Vec::new();
    }
    keyed_texts(
        ctx,
        listed,
        |name| {
            (!is_output_name(name)).then(|| format!("output name \"{name}\" must be 1 to {MAX_OUTPUT_NAME_LEN} letters, digits, _ and -, starting with a letter or _"))
        },
        |ctx, name, value| string(ctx, value, &format!("output {name}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_follow_docker_s_grammar() {
        for good in [
            "postgres",
            "postgres:16",
            "library/redis:7.2-alpine",
            "registry.local:5000/team/app:v1",
            "localhost/app",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "img:${{ needs.build.outputs.tag }}",
        ] {
            assert_eq!(image_name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "Postgres",
            "a b",
            "team/App",
            "app:",
            "app:-x",
            "a//b",
            "app@sha256:12",
            "/app",
        ] {
            assert!(image_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn ports_parse_in_their_three_forms() {
        assert_eq!(
            parse_port("5432"),
            Ok(ServicePort {
                container: 5432,
                host: None,
                protocol: PortProtocol::Tcp
            })
        );
        assert_eq!(
            parse_port("15432:5432/udp"),
            Ok(ServicePort {
                container: 5432,
                host: Some(15432),
                protocol: PortProtocol::Udp
            })
        );
        for bad in ["0", "65536", "a", "1:2:3", "80/sctp", ":80", "80:"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_names_are_dns_labels() {
        assert!(is_dns_label("postgres-16"));
        for bad in ["", "-a", "a-", "Pg", "a_b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }
}
