//! Repositories the coordinator mirrors (table `repos`) and the repository side of each
//! run built from one (table `run_repos`): which repository, the full ref, the pull
//! request. (Kept beside `runs` rather than in [`super::RunRecord`] so a run's record
//! keeps its shape; a run without a repository has no row here.)

use std::collections::BTreeMap;

use gantry_protocol::RunId;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::db::{encode, eng, update, Store, StoreError};

/// Repositories by name → [`RepoRecord`].
const REPOS: TableDefinition<&str, &[u8]> = TableDefinition::new("repos");
/// Repositories' webhook settings, by name → [`RepoHookRecord`] (a table of its own so
/// [`RepoRecord`]'s stored layout is unchanged; written and removed with the repository).
const REPO_HOOKS: TableDefinition<&str, &[u8]> = TableDefinition::new("repo_hooks");
/// Runs built from a repository, by run number → [`RunRepoRecord`].
const RUN_REPOS: TableDefinition<u64, &[u8]> = TableDefinition::new("run_repos");
/// Repositories by name → [`RepoStatusRecord`], when the admin gave one. A table of
/// its own so a stored [`RepoRecord`] keeps its encoding.
const REPO_STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("repo_status");

/// Where and as whom a repository's commit statuses go, when not derived from the
/// repository itself (`repos add --api-url`, `--status-token-secret`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoStatusRecord {
    /// The forge's API base (`https://host/api/v1`).
    pub api_url: Option<String>,
    /// The stored secret holding the API token, instead of the fetch token.
    pub token_secret: Option<String>,
}

/// How the coordinator authenticates to a repository's server, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepoCredentials {
    None,
    /// The name of a stored secret holding an https token.
    TokenSecret(String),
    /// An ssh private key, sealed (AES-256-GCM) under the name `repo-ssh-key:<repo>`.
    SshKey(Vec<u8>),
}

gantry_protocol::repo_struct! {
    /// A repository as stored: its view's fields with its credentials and its heads as a
    /// map, then what only the store keeps.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RepoRecord {
        pub credentials: RepoCredentials,
        /// Branch and tag heads after the last fetch (full ref → commit hex): what the
        /// poller compares the next fetch with.
        pub heads: BTreeMap<String, String>,
        /// Unix seconds up to which the pipeline's `on.schedule` has been checked (a
        /// firing after this starts a run of the default branch's head).
        pub schedule_checked_until: u64,
    }
}

/// How a repository takes webhook deliveries (`POST /hooks/repos/NAME`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoHookRecord {
    /// The stored secret the forge signs deliveries with; `None`: every delivery refused.
    pub secret: Option<String>,
    /// Whether fork pull requests run (untrusted); refused if `false`.
    pub fork_pull_requests: bool,
}

/// The repository side of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRepoRecord {
    pub repo: String,
    /// The full ref built (`refs/heads/main`, `refs/tags/v1`); empty for a bare commit.
    pub full_ref: String,
    pub pr_number: Option<u64>,
    pub pr_base: Option<String>,
}

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(REPOS).map_err(eng!("open repos"))?;
    tx.open_table(RUN_REPOS).map_err(eng!("open run repos"))?;
    tx.open_table(REPO_HOOKS).map_err(eng!("open repo hooks"))?;
    tx.open_table(REPO_STATUS)
        .map_err(eng!("open repo status"))?;
    Ok(())
}

impl Store {
    /// Stores a new repository and its audit entry; `false` (nothing written) if one of
    /// that name exists.
    pub fn add_repo(
        &self,
        repo: &RepoRecord,
        hook: &RepoHookRecord,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(REPOS).map_err(eng!("open repos"))?;
            if table
                .get(repo.name.as_str())
                .map_err(eng!("read repo"))?
                .is_some()
            {
                return Ok(false);
            }
            table
                .insert(repo.name.as_str(), encode(repo)?.as_slice())
                .map_err(eng!("write repo"))?;
            drop(table);
            tx.open_table(REPO_HOOKS)
                .map_err(eng!("open repo hooks"))?
                .insert(repo.name.as_str(), encode(hook)?.as_slice())
                .map_err(eng!("write repo hook"))?;
            Self::append_audit(tx, audit)?;
            Ok(true)
        })
    }

    pub fn repo(&self, name: &str) -> Result<Option<RepoRecord>, StoreError> {
        self.get(REPOS, name, ["open repos", "read repo"], "repo")
    }

    /// A repository's webhook settings (the default, all refused, if none were stored).
    pub fn repo_hook(&self, name: &str) -> Result<RepoHookRecord, StoreError> {
        Ok(self
            .get(
                REPO_HOOKS,
                name,
                ["open repo hooks", "read repo hook"],
                "repo hook",
            )?
            .unwrap_or_default())
    }

    /// Every repository, by name.
    pub fn repos(&self) -> Result<Vec<RepoRecord>, StoreError> {
        self.all(REPOS, ["open repos", "scan repos"], "repo")
    }

    /// Changes a stored repository (its fetch state); `None` if it was removed meanwhile.
    pub fn update_repo(
        &self,
        name: &str,
        change: impl FnOnce(&mut RepoRecord),
    ) -> Result<Option<RepoRecord>, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(REPOS).map_err(eng!("open repos"))?;
            update(
                &mut table,
                name,
                ["read repo", "write repo"],
                "repo",
                change,
            )
        })
    }

    /// Removes a repository; `false` if there was none.
    pub fn remove_repo(&self, name: &str, audit: &AuditEntry) -> Result<bool, StoreError> {
        let removed = self.remove_named(REPOS, name, audit)?;
        self.write(|tx| {
            tx.open_table(REPO_HOOKS)
                .map_err(eng!("open repo hooks"))?
                .remove(name)
                .map_err(eng!("remove repo hook"))?;
            Ok(())
        })?;
        Ok(removed)
    }

    /// Sets (or with `None` clears) where a repository's statuses go.
    pub fn set_repo_status(
        &self,
        name: &str,
        record: Option<&RepoStatusRecord>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut table = tx
                .open_table(REPO_STATUS)
                .map_err(eng!("open repo status"))?;
            match record {
                Some(r) => table.insert(name, encode(r)?.as_slice()).map(drop),
                None => table.remove(name).map(drop),
            }
            .map_err(eng!("write repo status"))?;
            Ok(())
        })
    }

    /// Where a repository's statuses go, as the admin gave it (default: derived).
    pub fn repo_status(&self, name: &str) -> Result<RepoStatusRecord, StoreError> {
        Ok(self
            .get(
                REPO_STATUS,
                name,
                ["open repo status", "read repo status"],
                "repo status",
            )?
            .unwrap_or_default())
    }

    /// Records which repository and ref a run builds.
    pub fn put_run_repo(&self, run: RunId, record: &RunRepoRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(RUN_REPOS)
                .map_err(eng!("open run repos"))?
                .insert(run.0, encode(record)?.as_slice())
                .map_err(eng!("write run repo"))?;
            Ok(())
        })
    }

    /// The repository side of a run; `None` for a run without a repository.
    pub fn run_repo(&self, run: RunId) -> Result<Option<RunRepoRecord>, StoreError> {
        self.get(
            RUN_REPOS,
            run.0,
            ["open run repos", "read run repo"],
            "run repo",
        )
    }
}

#[cfg(test)]
mod tests {
    use gantry_protocol::UnixMillis;

    use super::super::db::decode;
    use super::*;

    /// A repository record as coordinators wrote it when its fields were listed here
    /// (postcard: `app` at `https://g/app` on `gitea`, a token from secret `tok`, pipeline
    /// file `.gantry.yml`, polled every 60 s, created by `t` at 5, fetched at 7 without
    /// an error, `main` at `abc`, schedules checked up to 9).
    const REPO: &[u8] = b"\x03app\x0dhttps://g/app\x01\x05gitea\x01\x03tok\x0b.gantry.yml\x01\x3c\x05\x01t\x01\x07\x00\x01\x0frefs/heads/main\x03abc\x09";

    #[test]
    fn repo_records_keep_their_layout() {
        let record: RepoRecord = decode("repo", "app", REPO).expect("decode");
        assert_eq!(
            record,
            RepoRecord {
                name: "app".into(),
                url: "https://g/app".into(),
                forge: Some("gitea".into()),
                credentials: RepoCredentials::TokenSecret("tok".into()),
                pipeline_file: ".gantry.yml".into(),
                poll_secs: Some(60),
                created_at: UnixMillis(5),
                created_by: "t".into(),
                fetched_at: Some(UnixMillis(7)),
                last_error: None,
                heads: BTreeMap::from([("refs/heads/main".into(), "abc".into())]),
                schedule_checked_until: 9,
            }
        );
        assert_eq!(encode(&record).expect("encode"), REPO);
    }
}
