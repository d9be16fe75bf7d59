//! `mqseal export`: another broker's access configuration from mqseal's
//! store and registry (`mqseal_controller::export`).

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use mqseal_agent::config::AgentConfig;
use mqseal_client::{rng, unix_ms};
use mqseal_controller::config::ControllerConfig;
use mqseal_controller::export::{emqx, rabbitmq};
use mqseal_store::{AnyStore, CredentialStore, StoreKind, write_private};
use serde_json::json;
use zeroize::Zeroizing;

use super::{Exit, Failure, first_line_of, registry, store};

#[derive(Subcommand)]
pub enum ExportCmd {
    /// RabbitMQ (MQTT plugin): a definitions file for `rabbitmqctl import_definitions`.
    Rabbitmq(RabbitArgs),
    /// EMQX 5: its MongoDB authenticators and authorizer for this store's
    /// collection, and the ACL documents the authorizer reads (written to
    /// the store's database).
    Emqx(EmqxArgs),
}

#[derive(Args)]
pub struct EmqxArgs {
    /// Where to write the configuration (JSON, which is HOCON; 0600: it may
    /// hold the MongoDB password); `-` for standard output.
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// The collection of ACL documents (replaced on every export).
    #[arg(long, default_value = "mqtt_acl")]
    acl_collection: String,
}

#[derive(Args)]
pub struct RabbitArgs {
    /// Where to write it (0600: it holds password hashes); `-` for standard output.
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// The virtual host the MQTT plugin uses (`mqtt.vhost`).
    #[arg(long, default_value = "/")]
    vhost: String,
    /// A user's password, from the first line of FILE (repeatable): devices'
    /// come from their agent bundles, this controller's from its config.
    #[arg(long = "password", value_name = "USER=FILE")]
    passwords: Vec<String>,
}

pub(super) async fn run(c: &ControllerConfig, cmd: ExportCmd, json: bool) -> Result<Exit, Failure> {
    match cmd {
        ExportCmd::Rabbitmq(a) => rabbitmq(c, a, json).await,
        ExportCmd::Emqx(a) => emqx(c, a, json).await,
    }
}

async fn emqx(c: &ControllerConfig, a: EmqxArgs, json: bool) -> Result<Exit, Failure> {
    let (sc, _) = c.store().map_err(Failure::local)?;
    let uri = match (&sc.kind, &sc.mongodb_uri) {
        (StoreKind::Mongodb, Some(uri)) => uri.clone(),
        _ => {
            return Err(Failure::usage(
                "EMQX reads mqseal's users from MongoDB: `export emqx` needs [store] kind = \"mongodb\"",
            ));
        }
    };
    let target = emqx::Target {
        mongo: emqx::parse_uri(&uri).map_err(Failure::usage)?,
        database: sc.database.clone(),
        users: sc.collection.clone(),
        acl: a.acl_collection.clone(),
        pbkdf2_iterations: c.pbkdf2_iterations,
    };
    let AnyStore::Mongo(m) = store(c).await? else {
        return Err(Failure::local("a MongoDB store opened as a file"));
    };
    let users = m.list().await.map_err(|e| Failure::local(format!("credential store: {e}")))?;
    let docs = emqx::acl_documents(&users);
    let removed = m
        .replace_marked(&a.acl_collection, emqx::MARKER, &format!("{}-{}", unix_ms(), std::process::id()), &docs)
        .await
        .map_err(|e| Failure::local(format!("ACL documents: {e}")))?;
    let text = Zeroizing::new(serde_json::to_string_pretty(&emqx::config(&target)).map_err(Failure::local)?);
    write_out(&a.out, &text)?;
    if json {
        println!(
            "{}",
            json!({ "out": a.out, "acl_collection": a.acl_collection, "acl_documents": docs.len(), "replaced": removed })
        );
    } else {
        eprintln!("mqseal: export: {} ACL documents in {} (replacing {removed})", docs.len(), a.acl_collection);
    }
    Ok(Exit::Ok)
}

/// Writes `text` to `out` (0600), or to standard output for `-`.
fn write_out(out: &std::path::Path, text: &str) -> Result<(), Failure> {
    if out.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        write_private(out, text.as_bytes()).map_err(|e| Failure::local(format!("{}: {e}", out.display())))
    }
}

async fn rabbitmq(c: &ControllerConfig, a: RabbitArgs, json: bool) -> Result<Exit, Failure> {
    let users = store(c).await?.list().await.map_err(|e| Failure::local(format!("credential store: {e}")))?;
    let passwords = known_passwords(c, &a.passwords)?;
    let (defs, warnings) = rabbitmq::definitions(&users, &passwords, &a.vhost, &mut rng());
    let text = Zeroizing::new(serde_json::to_string_pretty(&defs).map_err(Failure::local)?);
    write_out(&a.out, &text)?;
    for w in &warnings {
        eprintln!("mqseal: export: {w}");
    }
    if a.out.as_os_str() != "-" {
        if json {
            println!("{}", json!({ "out": a.out, "users": defs.users.len(), "warnings": warnings }));
        } else {
            println!(
                "wrote {} ({} users): load it with `rabbitmqctl import_definitions {}`",
                a.out.display(),
                defs.users.len(),
                a.out.display()
            );
        }
    }
    Ok(Exit::Ok)
}

/// Passwords the export can hash: every device's from its bundle, this
/// controller's from its config, and those given with `--password`.
fn known_passwords(c: &ControllerConfig, given: &[String]) -> Result<HashMap<String, Zeroizing<String>>, Failure> {
    let mut out = HashMap::new();
    let agents = c.resolve(&c.data_dir).join("agents");
    for id in registry(c)?.devices.keys() {
        let bundle = agents.join(format!("{id}.toml"));
        let Ok(agent) = AgentConfig::load(&bundle) else {
            // A device whose bundle was handed over and deleted: named in the warnings.
            continue;
        };
        let base = bundle.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        if let Ok(p) = agent.broker.password(&base) {
            out.insert(id.clone(), p);
        }
    }
    if let Some(b) = &c.broker
        && let Ok(p) = b.password(&c.base)
    {
        out.insert(b.username.clone(), p);
    }
    for g in given {
        let (user, file) =
            g.split_once('=').ok_or_else(|| Failure::usage(format!("--password {g:?}: expected USER=FILE")))?;
        let password = first_line_of(std::path::Path::new(file))?;
        if password.is_empty() {
            return Err(Failure::usage(format!("{file}: empty password")));
        }
        out.insert(user.to_owned(), password);
    }
    Ok(out)
}
