//! Loading the relay's settings: defaults < TOML file (`--config`) < `PORTHOLE_*`
//! environment < flags.
//!
//! The file is parsed straight into [`RelayConfig`] (unknown keys refused, errors name the
//! file, the key and the line). Then every setting given on the command line or in the
//! environment (clap knows which: `ArgMatches::value_source`) replaces the file's value. Arg
//! ids are the field names, so no setting is listed twice.

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
    let from_file = parse_file(path)?;
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

/// Reads and parses one TOML file. Errors start with `config file PATH:` and name the key
/// (toml's own message adds the line and column).
pub fn parse_file(path: &Path) -> Result<RelayConfig, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("config file {shown}: {e}"))?;
    parse_str(&text).map_err(|e| format!("config file {shown}: {e}"))
}

/// Parses TOML text into settings; errors name the key (and, through toml, the line).
pub fn parse_str(text: &str) -> Result<RelayConfig, String> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        if key == "." || inner.contains(&format!("`{key}`")) {
            inner
        } else {
            format!("key `{key}`: {inner}")
        }
    })
}

/// Where the value of setting `key` came from, for error messages: a flag, a variable, or
/// (otherwise) the file, when there is one.
pub fn origin(matches: &ArgMatches, key: &str, file: Option<&Path>) -> String {
    let flag = key.replace('_', "-");
    match matches
        .try_get_raw(key)
        .ok()
        .and_then(|_| matches.value_source(key))
    {
        Some(ValueSource::CommandLine) => format!("flag --{flag}"),
        Some(ValueSource::EnvVariable) => {
            format!("variable PORTHOLE_{}", key.to_ascii_uppercase())
        }
        _ => match file {
            Some(path) => format!("config file {}", path.display()),
            None => String::from("default"),
        },
    }
}
