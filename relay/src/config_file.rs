//! Loading the relay's settings: defaults < TOML file (`--config`) < `PORTHOLE_*`
//! environment < flags.
//!
//! The file is parsed straight into [`RelayConfig`] (unknown keys refused, errors name the
//! key and line). Then every setting given on the command line or in the environment (clap
//! knows which: `ArgMatches::value_source`) replaces the file's value. Arg ids are the field
//! names, so no setting is listed twice.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};

use crate::config::RelayConfig;

/// The settings from `matches` (flags and environment, clap defaults) layered over `file`.
pub fn load(matches: &ArgMatches, file: Option<&Path>) -> Result<RelayConfig, String> {
    let cli = RelayConfig::from_arg_matches(matches).map_err(|e| e.to_string())?;
    let Some(path) = file else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let from_file: RelayConfig =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let mut merged = serde_json::to_value(&from_file).map_err(|e| e.to_string())?;
    let given = serde_json::to_value(&cli).map_err(|e| e.to_string())?;
    for id in matches.ids().map(|id| id.as_str()) {
        let explicit = matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if let (true, Some(value), Some(map)) = (explicit, given.get(id), merged.as_object_mut()) {
            map.insert(id.to_owned(), value.clone());
        }
    }
    serde_json::from_value(merged).map_err(|e| format!("config file {}: {e}", path.display()))
}
