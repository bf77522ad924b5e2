//! The `GITPOD_ENV_*` rules by which added images edit the base image's environment.
//!
//! These are the reference facade's semantics, kept for drop-in compatibility, including its
//! naming: `APPEND` puts the value *in front of* the old one and `PREPEND` *behind* it.

use std::collections::{HashMap, HashSet};

const SET: &str = "GITPOD_ENV_SET_";
const APPEND: &str = "GITPOD_ENV_APPEND_";
const PREPEND: &str = "GITPOD_ENV_PREPEND_";

#[derive(Clone, Copy)]
enum Op {
    Set,
    Append,
    Prepend,
}

/// The edit an added image's variable asks for, or `None` when the variable is not one of the
/// rules (or is one the reference ignores: empty name, or empty value for APPEND/PREPEND).
fn parse_rule(var: &str) -> Option<(Op, &str, &str)> {
    let (key, value) = var.split_once('=')?;
    let (op, name) = if let Some(name) = key.strip_prefix(SET) {
        (Op::Set, name)
    } else if let Some(name) = key.strip_prefix(APPEND) {
        (Op::Append, name)
    } else if let Some(name) = key.strip_prefix(PREPEND) {
        (Op::Prepend, name)
    } else {
        return None;
    };
    if name.is_empty() {
        return None;
    }
    if value.is_empty() && !matches!(op, Op::Set) {
        return None;
    }
    Some((op, name, value))
}

/// Applies the `GITPOD_ENV_*` variables of the added images (`added_envs`, one slice per image,
/// in addition order) to `base_env` and returns the new environment.
///
/// - `GITPOD_ENV_SET_<NAME>=v` sets `NAME` to `v` (an empty `v` is allowed).
/// - `GITPOD_ENV_APPEND_<NAME>=v` makes the value `v` followed by the old value.
/// - `GITPOD_ENV_PREPEND_<NAME>=v` makes the value the old value followed by `v`.
///
/// No separator is inserted: images carry it themselves (`GITPOD_ENV_APPEND_PATH=/ide/bin:`).
/// A variable missing from the base has the empty string as its old value. Rules with an
/// empty name, and APPEND/PREPEND with an empty value, are ignored, as is every other variable
/// of the added images.
///
/// A variable keeps the position of its first occurrence; new ones are appended in order of
/// first appearance. Base entries that nothing edits are returned verbatim, including entries
/// without `=` and repeated names. When an edited name occurs more than once in the base, the
/// last occurrence supplies the old value (it is the one a runtime applies, and the one the
/// reference facade edits), the edited variable stays at the first position and the later
/// occurrences are dropped, so the edited value is the only one a runtime can see.
pub fn apply_env_rules(base_env: &[String], added_envs: &[&[String]]) -> Vec<String> {
    let mut entries: Vec<(Option<String>, String)> = Vec::with_capacity(base_env.len());
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    for var in base_env {
        let name = var.split_once('=').map(|(n, _)| n.to_string());
        if let Some(n) = &name {
            first.entry(n.clone()).or_insert(entries.len());
            last.insert(n.clone(), entries.len());
        }
        entries.push((name, var.clone()));
    }

    let mut edited: HashSet<String> = HashSet::new();
    for var in added_envs.iter().flat_map(|vars| vars.iter()) {
        let Some((op, name, value)) = parse_rule(var) else {
            continue;
        };
        let idx = match first.get(name) {
            Some(&i) => i,
            None => {
                first.insert(name.to_string(), entries.len());
                entries.push((Some(name.to_string()), format!("{name}=")));
                entries.len() - 1
            }
        };
        // The first edit of a repeated name starts from its last value.
        if !edited.contains(name)
            && let Some(&at) = last.get(name)
            && at != idx
            && let Some((_, last_text)) = entries.get(at)
        {
            let last_text = last_text.clone();
            if let Some((_, text)) = entries.get_mut(idx) {
                *text = last_text;
            }
        }
        let Some((_, text)) = entries.get_mut(idx) else {
            continue;
        };
        let old = text.split_once('=').map_or("", |(_, v)| v);
        let new = match op {
            Op::Set => value.to_string(),
            Op::Append => format!("{value}{old}"),
            Op::Prepend => format!("{old}{value}"),
        };
        *text = format!("{name}={new}");
        edited.insert(name.to_string());
    }

    entries
        .into_iter()
        .enumerate()
        .filter(|(i, (name, _))| match name {
            Some(n) if edited.contains(n) => first.get(n) == Some(i),
            _ => true,
        })
        .map(|(_, (_, text))| text)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn apply(base: &[&str], added: &[&[&str]]) -> Vec<String> {
        let added: Vec<Vec<String>> = added.iter().map(|a| s(a)).collect();
        let refs: Vec<&[String]> = added.iter().map(|a| a.as_slice()).collect();
        apply_env_rules(&s(base), &refs)
    }

    #[test]
    fn set_replaces_value_in_place() {
        let out = apply(&["A=1", "B=2", "C=3"], &[&["GITPOD_ENV_SET_B=x"]]);
        assert_eq!(out, s(&["A=1", "B=x", "C=3"]));
    }

    #[test]
    fn set_allows_empty_value() {
        assert_eq!(apply(&["A=1"], &[&["GITPOD_ENV_SET_A="]]), s(&["A="]));
    }

    #[test]
    fn append_puts_value_in_front() {
        let out = apply(&["PATH=/usr/bin"], &[&["GITPOD_ENV_APPEND_PATH=/ide/bin:"]]);
        assert_eq!(out, s(&["PATH=/ide/bin:/usr/bin"]));
    }

    #[test]
    fn prepend_puts_value_behind() {
        let out = apply(&["PATH=/usr/bin"], &[&["GITPOD_ENV_PREPEND_PATH=:/ide/bin"]]);
        assert_eq!(out, s(&["PATH=/usr/bin:/ide/bin"]));
    }

    #[test]
    fn no_separator_is_inserted() {
        let out = apply(&["X=a"], &[&["GITPOD_ENV_APPEND_X=b", "GITPOD_ENV_PREPEND_X=c"]]);
        assert_eq!(out, s(&["X=bac"]));
    }

    #[test]
    fn missing_base_var_counts_as_empty() {
        let out = apply(&["A=1"], &[&["GITPOD_ENV_APPEND_P=x:", "GITPOD_ENV_PREPEND_Q=:y", "GITPOD_ENV_SET_R=z"]]);
        assert_eq!(out, s(&["A=1", "P=x:", "Q=:y", "R=z"]));
    }

    #[test]
    fn new_keys_appended_in_order_of_first_appearance() {
        let out = apply(
            &["A=1"],
            &[&["GITPOD_ENV_SET_Z=1", "GITPOD_ENV_SET_Y=2"], &["GITPOD_ENV_SET_X=3", "GITPOD_ENV_SET_Z=4"]],
        );
        assert_eq!(out, s(&["A=1", "Z=4", "Y=2", "X=3"]));
    }

    #[test]
    fn empty_name_is_ignored_for_every_rule() {
        let out = apply(&["A=1"], &[&["GITPOD_ENV_SET_=x", "GITPOD_ENV_APPEND_=x", "GITPOD_ENV_PREPEND_=x"]]);
        assert_eq!(out, s(&["A=1"]));
    }

    #[test]
    fn empty_value_is_ignored_for_append_and_prepend() {
        let out = apply(&["A=1"], &[&["GITPOD_ENV_APPEND_A=", "GITPOD_ENV_PREPEND_A=", "GITPOD_ENV_APPEND_B="]]);
        assert_eq!(out, s(&["A=1"]));
    }

    #[test]
    fn other_variables_of_added_images_are_ignored() {
        let out =
            apply(&["A=1"], &[&["A=2", "PATH=/x", "GITPOD_ENV_SET_B", "GITPOD_ENV_UNSET_A=1", "gitpod_env_set_A=3"]]);
        assert_eq!(out, s(&["A=1"]));
    }

    #[test]
    fn images_apply_in_order() {
        let out = apply(
            &["PATH=/usr/bin", "HOME=/root"],
            &[
                &["GITPOD_ENV_APPEND_PATH=/ide/bin:"],
                &["GITPOD_ENV_APPEND_PATH=/sup/bin:", "GITPOD_ENV_SET_HOME=/home/gitpod"],
                &["GITPOD_ENV_PREPEND_PATH=:/late/bin", "GITPOD_ENV_SET_HOME=/workspace"],
            ],
        );
        assert_eq!(out, s(&["PATH=/sup/bin:/ide/bin:/usr/bin:/late/bin", "HOME=/workspace"]));
    }

    #[test]
    fn set_then_append_uses_set_value() {
        let out = apply(&["A=base"], &[&["GITPOD_ENV_SET_A=s"], &["GITPOD_ENV_APPEND_A=x"]]);
        assert_eq!(out, s(&["A=xs"]));
    }

    #[test]
    fn value_may_contain_equals_sign() {
        let out = apply(&[], &[&["GITPOD_ENV_SET_OPTS=a=b=c"]]);
        assert_eq!(out, s(&["OPTS=a=b=c"]));
    }

    #[test]
    fn base_entries_without_equals_are_kept_verbatim() {
        let out = apply(&["JUSTNAME", "A=1"], &[&["GITPOD_ENV_SET_JUSTNAME=v"]]);
        // The verbatim entry is not a variable assignment, so the SET makes a new variable.
        assert_eq!(out, s(&["JUSTNAME", "A=1", "JUSTNAME=v"]));
    }

    #[test]
    fn unedited_duplicates_are_kept_and_edited_ones_collapse_to_first_position() {
        let out = apply(&["A=1", "B=1", "A=2", "B=2"], &[&["GITPOD_ENV_APPEND_A=x:"]]);
        assert_eq!(out, s(&["A=x:2", "B=1", "B=2"]));
    }

    #[test]
    fn edit_of_a_repeated_variable_starts_from_its_last_value() {
        // A runtime applies the last of repeated entries, so that is the value being edited.
        let base = ["PATH=/first", "HOME=/root", "PATH=/usr/local/bin:/usr/bin"];
        let out = apply(&base, &[&["GITPOD_ENV_APPEND_PATH=/ide/bin:"]]);
        assert_eq!(out, s(&["PATH=/ide/bin:/usr/local/bin:/usr/bin", "HOME=/root"]));
        let out = apply(&base, &[&["GITPOD_ENV_PREPEND_PATH=:/late"], &["GITPOD_ENV_APPEND_PATH=/early:"]]);
        assert_eq!(out, s(&["PATH=/early:/usr/local/bin:/usr/bin:/late", "HOME=/root"]));
        let out = apply(&["X=1", "X=2", "X=3"], &[&["GITPOD_ENV_SET_X=new"]]);
        assert_eq!(out, s(&["X=new"]));
    }

    #[test]
    fn empty_inputs_give_empty_env() {
        assert!(apply(&[], &[]).is_empty());
        assert!(apply(&[], &[&["FOO=bar"]]).is_empty());
    }

    #[test]
    fn base_is_returned_verbatim_without_rules() {
        let base = ["A=1", "=weird", "NOEQ", "B=x=y"];
        assert_eq!(apply(&base, &[&["C=3"]]), s(&base));
    }
}
