//! The allow-list: what a verified command may make the device do.
//!
//! A verified envelope proves *who* sent a command, not that running it is
//! safe. So a command name maps either to a built-in action or to a program
//! with a fixed argv, and arguments from the network only ever fill declared,
//! typed slots in that argv — as whole `argv` elements or inside a fixed
//! element such as `--level={level}`. There is no shell anywhere, so `;`,
//! `$(…)` and quotes are just characters; and string arguments may not start
//! with `-`, so an argument can never turn into an option of the program.

use serde::{Deserialize, Serialize};

/// One allow-listed command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// A built-in action: `ping`, `noop`, `info` or `echo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// A program: absolute path first, then fixed arguments, where `{name}`
    /// stands for the declared argument `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<Vec<String>>,
    /// The arguments the command takes, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgSpec>,
    /// Stop the program after this long (default `limits.default_timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Argument sets this command accepts in *hidden* challenge form, where
    /// the command never travels and the device must recognise it among the
    /// ones it knows in full. A command without arguments is always known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<Vec<String>>,
}

/// One declared argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSpec {
    /// Its name, used as `{name}` in `program`.
    pub name: String,
    /// `string`, `int`, `bool` or `choice`.
    #[serde(rename = "type")]
    pub kind: ArgKind,
    /// `string`: longest accepted value in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// `int`: smallest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// `int`: largest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// `choice`: the accepted values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Argument types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgKind {
    /// Printable text, no control characters, not starting with `-`.
    String,
    /// A decimal integer within `min..=max`.
    Int,
    /// `true` or `false`.
    Bool,
    /// One of `values`.
    Choice,
}

/// Built-in actions (no process is started).
pub const BUILTINS: [&str; 4] = ["ping", "noop", "info", "echo"];

impl ArgSpec {
    /// A string argument of at most `max_len` bytes.
    pub fn string(name: &str, max_len: usize) -> ArgSpec {
        ArgSpec {
            name: name.into(),
            kind: ArgKind::String,
            max_len: Some(max_len),
            min: None,
            max: None,
            values: vec![],
        }
    }

    /// Checks one value, returning it in canonical form (integers without
    /// leading zeros or `+`, so a program sees one spelling of each number).
    pub fn accept(&self, value: &str) -> Result<String, String> {
        let name = &self.name;
        match self.kind {
            ArgKind::String => {
                let max = self.max_len.unwrap_or(mqseal_proto::limits::MAX_ARG_LEN);
                if value.len() > max {
                    return Err(format!("argument {name}: longer than {max} bytes"));
                }
                if value.starts_with('-') {
                    return Err(format!("argument {name}: may not start with '-'"));
                }
                if value.chars().any(char::is_control) {
                    return Err(format!("argument {name}: contains a control character"));
                }
                Ok(value.to_owned())
            }
            ArgKind::Int => {
                let n: i64 = value.parse().map_err(|_| format!("argument {name}: {value:?} is not an integer"))?;
                let (min, max) = (self.min.unwrap_or(i64::MIN), self.max.unwrap_or(i64::MAX));
                if n < min || n > max {
                    return Err(format!("argument {name}: {n} is outside {min}..={max}"));
                }
                Ok(n.to_string())
            }
            ArgKind::Bool => match value {
                "true" | "false" => Ok(value.to_owned()),
                _ => Err(format!("argument {name}: {value:?} is not true or false")),
            },
            ArgKind::Choice => {
                if self.values.iter().any(|v| v == value) {
                    Ok(value.to_owned())
                } else {
                    Err(format!("argument {name}: {value:?} is not one of {}", self.values.join(", ")))
                }
            }
        }
    }
}

impl CommandSpec {
    /// A built-in with these arguments.
    pub fn builtin(name: &str, args: Vec<ArgSpec>) -> CommandSpec {
        CommandSpec { builtin: Some(name.into()), program: None, args, timeout_ms: None, hidden: vec![] }
    }

    /// Load-time checks, so a bad allow-list stops the agent at start.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if mqseal_proto::Call::new(name, &[]).is_err() {
            return Err("command names are 1-64 bytes".into());
        }
        match (&self.builtin, &self.program) {
            (Some(b), None) if BUILTINS.contains(&b.as_str()) => {}
            (Some(b), None) => return Err(format!("unknown builtin {b:?} (one of {})", BUILTINS.join(", "))),
            (None, Some(argv)) => {
                let Some(first) = argv.first() else { return Err("program is empty".into()) };
                if !first.starts_with('/') {
                    return Err(format!("program {first:?} must be an absolute path (no PATH lookup)"));
                }
                if first.contains('{') {
                    return Err("the program path itself cannot be an argument".into());
                }
            }
            _ => return Err("set exactly one of builtin or program".into()),
        }
        if self.builtin.as_deref() == Some("echo") && self.args.len() != 1 {
            return Err("builtin echo takes exactly one argument".into());
        }
        if self.args.len() > mqseal_proto::limits::MAX_ARGS {
            return Err(format!("at most {} arguments", mqseal_proto::limits::MAX_ARGS));
        }
        for (i, a) in self.args.iter().enumerate() {
            if a.name.is_empty() || !a.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("args[{i}].name must be letters, digits and _"));
            }
            if a.kind == ArgKind::Choice && a.values.is_empty() {
                return Err(format!("args[{i}] ({}): a choice needs values", a.name));
            }
            if let (Some(min), Some(max)) = (a.min, a.max)
                && min > max
            {
                return Err(format!("args[{i}] ({}): min > max", a.name));
            }
        }
        for set in &self.hidden {
            self.accept(set).map_err(|e| format!("hidden {set:?}: {e}"))?;
        }
        Ok(())
    }

    /// Checks the arguments of a verified command against the declaration.
    pub fn accept(&self, args: &[String]) -> Result<Vec<String>, String> {
        if args.len() != self.args.len() {
            return Err(format!("takes {} argument(s), got {}", self.args.len(), args.len()));
        }
        self.args.iter().zip(args).map(|(spec, v)| spec.accept(v)).collect()
    }

    /// The program's argv with accepted arguments substituted.
    pub fn argv(&self, accepted: &[String]) -> Option<Vec<String>> {
        let program = self.program.as_ref()?;
        Some(
            program
                .iter()
                .map(|part| {
                    self.args
                        .iter()
                        .zip(accepted)
                        .fold(part.clone(), |s, (spec, v)| s.replace(&format!("{{{}}}", spec.name), v))
                })
                .collect(),
        )
    }

    /// The argument sets this command is known by in hidden form.
    pub fn hidden_forms(&self) -> Vec<Vec<String>> {
        let mut forms = self.hidden.clone();
        if self.args.is_empty() && !forms.iter().any(Vec::is_empty) {
            forms.push(vec![]);
        }
        forms
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn program(argv: &[&str], args: Vec<ArgSpec>) -> CommandSpec {
        CommandSpec {
            builtin: None,
            program: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
            args,
            timeout_ms: None,
            hidden: vec![],
        }
    }

    #[test]
    fn arguments_fill_typed_slots_and_nothing_else() {
        let level = ArgSpec { kind: ArgKind::Int, min: Some(0), max: Some(10), ..ArgSpec::string("level", 0) };
        let mode =
            ArgSpec { kind: ArgKind::Choice, values: vec!["on".into(), "off".into()], ..ArgSpec::string("mode", 0) };
        let spec = program(&["/usr/bin/set", "--level={level}", "{mode}"], vec![level, mode]);
        spec.check("set").unwrap();
        let ok = spec.accept(&["007".into(), "on".into()]).unwrap();
        assert_eq!(spec.argv(&ok).unwrap(), ["/usr/bin/set", "--level=7", "on"]);
        for bad in [["11", "on"], ["x", "on"], ["1", "maybe"], ["1; rm -rf /", "on"]] {
            let args: Vec<String> = bad.iter().map(|s| (*s).to_owned()).collect();
            assert!(spec.accept(&args).is_err(), "{bad:?}");
        }
        assert!(spec.accept(&["1".into()]).unwrap_err().contains("takes 2"));
    }

    #[test]
    fn strings_cannot_become_options_or_carry_control_characters() {
        let s = ArgSpec::string("text", 8);
        assert_eq!(s.accept("a b;$(x)").unwrap(), "a b;$(x)", "no shell: these are just characters");
        assert!(s.accept("--rm").unwrap_err().contains("'-'"));
        assert!(s.accept("a\nb").unwrap_err().contains("control"));
        assert!(s.accept("123456789").unwrap_err().contains("longer"));
    }

    #[test]
    fn bad_declarations_are_refused_at_load() {
        assert!(program(&["sh", "-c"], vec![]).check("x").unwrap_err().contains("absolute"));
        assert!(CommandSpec::builtin("format-disk", vec![]).check("x").unwrap_err().contains("unknown builtin"));
        let mut c = CommandSpec::builtin("ping", vec![]);
        c.program = Some(vec!["/bin/true".into()]);
        assert!(c.check("x").unwrap_err().contains("exactly one"));
        let mut h =
            program(&["/bin/x", "{n}"], vec![ArgSpec { kind: ArgKind::Int, max: Some(3), ..ArgSpec::string("n", 0) }]);
        h.hidden = vec![vec!["9".into()]];
        assert!(h.check("x").unwrap_err().contains("hidden"));
    }
}
