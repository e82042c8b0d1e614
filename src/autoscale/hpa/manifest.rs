//! Finding the HPA in a rendered manifest: a multi-document YAML file or a JSON `kind: List`
//! (what kubenix emits), possibly holding many other objects.

use std::path::Path;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use serde::Deserialize;

use super::HpaError;
use super::spec::HpaSpec;

/// Reads `path` and returns the defaulted spec of its `autoscaling/v2` HPA; `name` picks one
/// when the file holds several.
pub fn load_hpa_file(path: &Path, name: Option<&str>) -> Result<HpaSpec, HpaError> {
    let text =
        std::fs::read_to_string(path).map_err(|cause| HpaError::Read { path: path.display().to_string(), cause })?;
    parse_hpa_manifest(&text, name).map_err(|e| e.in_file(path))
}

/// Like [`load_hpa_file`] for text already in memory.
pub fn parse_hpa_manifest(text: &str, name: Option<&str>) -> Result<HpaSpec, HpaError> {
    let hpa = find_hpa(text, name)?;
    HpaSpec::from_k8s(&hpa)
}

/// The HPA object itself, before conversion (for callers that want the raw API type).
pub fn find_hpa(text: &str, name: Option<&str>) -> Result<HorizontalPodAutoscaler, HpaError> {
    let mut objects = Vec::new();
    if text.trim_start().starts_with(['{', '[']) {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| HpaError::Parse(format!("not valid JSON: {e}")))?;
        collect_json(value, &mut objects);
    } else {
        for document in serde_norway::Deserializer::from_str(text) {
            let value = serde_norway::Value::deserialize(document)
                .map_err(|e| HpaError::Parse(format!("not valid YAML: {e}")))?;
            collect_yaml(value, &mut objects)?;
        }
    }

    let mut kinds_seen = Vec::new();
    let mut candidates = Vec::new();
    for object in objects {
        let (api_version, kind) = (object.api_version.as_str(), object.kind.as_str());
        if kind == "HorizontalPodAutoscaler" && api_version == "autoscaling/v2" {
            let hpa = (object.decode)().map_err(|e| {
                HpaError::Parse(format!(
                    "the autoscaling/v2 HorizontalPodAutoscaler does not match the API schema: {e}"
                ))
            })?;
            candidates.push(hpa);
        } else {
            // A missing apiVersion or kind is said as such, not as a blank.
            let shown = |v: &str, what: &str| if v.is_empty() { format!("<no {what}>") } else { v.to_owned() };
            kinds_seen.push(format!("{} {}", shown(api_version, "apiVersion"), shown(kind, "kind")));
        }
    }

    let names = |hpas: &[HorizontalPodAutoscaler]| {
        hpas.iter()
            .map(|h| h.metadata.name.clone().unwrap_or_else(|| "<unnamed>".into()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(wanted) => {
            let listed = names(&candidates);
            candidates
                .into_iter()
                .find(|h| h.metadata.name.as_deref() == Some(wanted))
                .ok_or_else(|| HpaError::NameNotFound { name: wanted.to_owned(), found: listed })
        }
        None => match candidates.len() {
            0 => Err(HpaError::NotFound {
                seen: if kinds_seen.is_empty() { "no objects".to_owned() } else { kinds_seen.join(", ") },
            }),
            1 => Ok(candidates.remove(0)),
            _ => Err(HpaError::Ambiguous { found: names(&candidates) }),
        },
    }
}

/// One Kubernetes object found in the file, decoded lazily: only HPAs are decoded into the API
/// type, so unrelated objects with fields this crate does not know cannot fail the load.
struct FoundObject {
    api_version: String,
    kind: String,
    decode: Box<dyn FnOnce() -> Result<HorizontalPodAutoscaler, String>>,
}

fn collect_json(value: serde_json::Value, out: &mut Vec<FoundObject>) {
    match value {
        serde_json::Value::Array(items) => items.into_iter().for_each(|v| collect_json(v, out)),
        serde_json::Value::Object(ref map) => {
            let text = |key: &str| map.get(key).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            let (api_version, kind) = (text("apiVersion"), text("kind"));
            if kind.ends_with("List") && map.get("items").is_some_and(|i| i.is_array()) {
                if let serde_json::Value::Object(mut map) = value
                    && let Some(items) = map.remove("items")
                {
                    collect_json(items, out);
                }
                return;
            }
            out.push(FoundObject {
                api_version,
                kind,
                decode: Box::new(move || {
                    // Through text, so that quantities written as JSON numbers reach
                    // k8s-openapi's visitor as numbers whatever serde_json features are on.
                    serde_json::from_str(&value.to_string()).map_err(|e| e.to_string())
                }),
            });
        }
        _ => {}
    }
}

fn collect_yaml(value: serde_norway::Value, out: &mut Vec<FoundObject>) -> Result<(), HpaError> {
    match value {
        serde_norway::Value::Sequence(items) => {
            for item in items {
                collect_yaml(item, out)?;
            }
        }
        serde_norway::Value::Mapping(ref map) => {
            let text = |key: &str| map.get(key).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            let (api_version, kind) = (text("apiVersion"), text("kind"));
            if kind.ends_with("List") && map.get("items").is_some_and(|i| i.is_sequence()) {
                if let serde_norway::Value::Mapping(mut map) = value
                    && let Some(items) = map.remove("items")
                {
                    collect_yaml(items, out)?;
                }
                return Ok(());
            }
            out.push(FoundObject {
                api_version,
                kind,
                decode: Box::new(move || serde_norway::from_value(value).map_err(|e| e.to_string())),
            });
        }
        // Empty documents (a trailing `---`, comments only) are fine.
        _ => {}
    }
    Ok(())
}
