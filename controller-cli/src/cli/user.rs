//! `mqseal user`: broker users (people and scripts).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use mqseal_controller::config::ControllerConfig;
use mqseal_store::{CredentialStore, Role, UserRecord};
use serde_json::json;
use zeroize::Zeroizing;

use super::{Exit, Failure, first_line_of, store};

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user; the password comes from a prompt, --password-file or --password-stdin.
    Add {
        /// Username.
        name: String,
        /// controller (default) or admin.
        #[arg(long, default_value = "controller")]
        role: String,
        /// Devices a controller may reach (repeatable; `*` for all).
        #[arg(long = "grant")]
        grants: Vec<String>,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change a user's password.
    Passwd {
        /// Username.
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Stop a user from logging in (live sessions are closed).
    Disable {
        /// Username.
        name: String,
    },
    /// Let a disabled user log in again.
    Enable {
        /// Username.
        name: String,
    },
    /// Delete a user.
    Del {
        /// Username.
        name: String,
    },
    /// List users and devices in the store.
    List,
}

#[derive(Args)]
pub struct PasswordArgs {
    /// Read the password from the first line of this file.
    #[arg(long, conflicts_with = "password_stdin")]
    password_file: Option<PathBuf>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

/// Reads a password from a file, stdin, or (on a terminal) a prompt —
/// never from the command line, where `ps` and shell history would show it.
fn read_password(args: &PasswordArgs, name: &str) -> Result<Zeroizing<String>, Failure> {
    let first_line = |s: &str| Zeroizing::new(s.lines().next().unwrap_or("").to_owned());
    let password = if let Some(f) = &args.password_file {
        first_line_of(f)?
    } else if args.password_stdin {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin().read_to_string(&mut text).map_err(|e| Failure::local(format!("stdin: {e}")))?;
        first_line(&text)
    } else if std::io::stdin().is_terminal() {
        let a = Zeroizing::new(rpassword::prompt_password(format!("password for {name}: ")).map_err(Failure::local)?);
        let b = Zeroizing::new(rpassword::prompt_password("again: ").map_err(Failure::local)?);
        if a != b {
            return Err(Failure::usage("the passwords differ"));
        }
        a
    } else {
        return Err(Failure::usage("stdin is not a terminal: use --password-file or --password-stdin"));
    };
    if password.len() < 8 {
        return Err(Failure::usage("passwords must be at least 8 characters"));
    }
    Ok(password)
}

/// Adds, changes, disables, enables, deletes or lists broker users.
pub(super) async fn run(c: &ControllerConfig, cmd: UserCmd, json: bool) -> Result<Exit, Failure> {
    let s = store(c).await?;
    let store_err = |e: mqseal_store::StoreError| Failure::local(format!("credential store: {e}"));
    let existing = |name: String| {
        let s = &s;
        async move { s.get(&name).await.map_err(store_err)?.ok_or_else(|| Failure::local(format!("no user {name}"))) }
    };
    let (action, name) = match cmd {
        UserCmd::Add { name, role, grants, password } => {
            let role: Role = role.parse().map_err(Failure::usage)?;
            if role == Role::Device {
                return Err(Failure::usage("devices are added with `mqseal device add`"));
            }
            let pw = read_password(&password, &name)?;
            let mut record =
                UserRecord::human(&name, pw.as_bytes(), role, c.pbkdf2_iterations).map_err(Failure::usage)?;
            record.grants = grants;
            record.validate().map_err(Failure::usage)?;
            s.put(&record, false).await.map_err(store_err)?;
            ("added", name)
        }
        UserCmd::Passwd { name, password } => {
            let old = existing(name.clone()).await?;
            let pw = read_password(&password, &name)?;
            let mut record =
                UserRecord::human(&name, pw.as_bytes(), old.role, c.pbkdf2_iterations).map_err(Failure::usage)?;
            record.grants = old.grants;
            record.disabled = old.disabled;
            s.put(&record, true).await.map_err(store_err)?;
            ("password changed", name)
        }
        UserCmd::Disable { name } => {
            let mut r = existing(name.clone()).await?;
            r.disabled = true;
            s.put(&r, true).await.map_err(store_err)?;
            ("disabled", name)
        }
        UserCmd::Enable { name } => {
            let mut r = existing(name.clone()).await?;
            r.disabled = false;
            s.put(&r, true).await.map_err(store_err)?;
            ("enabled", name)
        }
        UserCmd::Del { name } => {
            if !s.delete(&name).await.map_err(store_err)? {
                return Err(Failure::local(format!("no user {name}")));
            }
            ("deleted", name)
        }
        UserCmd::List => {
            let mut users = s.list().await.map_err(store_err)?;
            users.sort_by(|a, b| a.username.cmp(&b.username));
            if json {
                let rows: Vec<_> = users
                    .iter()
                    .map(|u| {
                        json!({ "username": u.username, "role": u.role.as_str(), "disabled": u.disabled,
                                "grants": u.grants, "algorithm": u.algorithm })
                    })
                    .collect();
                println!("{}", json!({ "users": rows }));
            } else {
                println!("{:<32} {:<10} {:<8} grants", "username", "role", "state");
                for u in &users {
                    let state = if u.disabled { "disabled" } else { "active" };
                    println!("{:<32} {:<10} {:<8} {}", u.username, u.role.as_str(), state, u.grants.join(","));
                }
            }
            return Ok(Exit::Ok);
        }
    };
    if json {
        println!("{}", json!({ "user": name, "result": action }));
    } else {
        println!("{name}: {action}");
    }
    Ok(Exit::Ok)
}
