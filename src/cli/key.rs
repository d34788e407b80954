//! `volback key list|add|remove|passwd REPO`: the key slots of an encrypted repository.

use super::args::{KeyArgs, KeyCommand};
use super::password;
use super::report::print_json;
use anyhow::Result;
use std::process::ExitCode;
use volback::repo::keys;

pub fn run(a: KeyArgs) -> Result<ExitCode> {
    match a.action {
        KeyCommand::List {
            repo,
            json,
            password,
        } => {
            let r = password::open(&repo, &password)?;
            let slots = keys::list_slots(&r)?;
            if json {
                print_json(&slots)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "  {:<16}  {:<20}  {:>10}  {:>6}  {:>5}",
                "ID", "CREATED", "MEMORY", "PASSES", "LANES"
            );
            for s in &slots {
                let mark = if s.current { "*" } else { " " };
                match (&s.params, &s.problem) {
                    (Some(p), None) => println!(
                        "{mark} {:<16}  {:<20}  {:>6} MiB  {:>6}  {:>5}",
                        s.id,
                        s.created.as_deref().unwrap_or(""),
                        p.memory_kib / 1024,
                        p.iterations,
                        p.parallelism
                    ),
                    (_, problem) => println!(
                        "{mark} {:<16}  UNUSABLE: {}",
                        s.id,
                        problem.as_deref().unwrap_or("unknown parameters")
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Add {
            repo,
            password,
            new_password,
            kdf,
        } => {
            let params = kdf.params()?;
            let r = password::open(&repo, &password)?;
            let new = password::new_password(&new_password, &repo)?;
            let id = keys::add_slot(&r, &new, params)?;
            println!("added key slot {id}");
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Remove { repo, id, password } => {
            let r = password::open(&repo, &password)?;
            keys::remove_slot(&r, &id)?;
            println!("removed key slot {id}");
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Passwd {
            repo,
            password,
            new_password,
            kdf,
        } => {
            let params = kdf.params()?;
            let r = password::open(&repo, &password)?;
            let old = r.current_slot().unwrap_or_default().to_string();
            let new = password::new_password(&new_password, &repo)?;
            let id = keys::change_password(&r, &new, params)?;
            println!("changed the password: key slot {id} replaces {old}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
