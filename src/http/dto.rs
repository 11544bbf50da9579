//! Wire types: the request body's JSON -> [`RawRequest`] (naming the field of a wrong JSON type),
//! and the response bodies.

use serde::Serialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::infer::{Generated, RawRequest};

/// Read the request fields from a JSON object. Unknown fields are ignored; `null` counts as absent.
pub fn raw_request(mut obj: Map<String, Value>) -> Result<RawRequest, ApiError> {
    let mut take = |name: &str| obj.remove(name).filter(|v| !v.is_null());
    Ok(RawRequest {
        prompt: string("prompt", take("prompt"))?,
        model: string("model", take("model"))?,
        width: integer("width", take("width"))?,
        height: integer("height", take("height"))?,
        num_images: integer("num_images", take("num_images"))?,
        resolution: string("resolution", take("resolution"))?,
        quality: string("quality", take("quality"))?,
        seed: integer("seed", take("seed"))?,
        steps: integer("steps", take("steps"))?,
        guidance_scale: number("guidance_scale", take("guidance_scale"))?,
        negative_prompt: string("negative_prompt", take("negative_prompt"))?,
        output_format: string("output_format", take("output_format"))?,
        // OpenAI's field; the hosted contract has none.
        output_compression: None,
    })
}

pub(super) fn wrong_type(name: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::InvalidRequest(format!("field '{name}' must be {expected}, not {got}"))
}

pub(super) fn string(name: &str, v: Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(name, "a string", &other)),
    }
}

/// An integer, also written as a float with no fraction (`512.0`). Values beyond i128 saturate,
/// so that they fail the field's range check rather than the type check.
pub(super) fn integer(name: &str, v: Option<Value>) -> Result<Option<i128>, ApiError> {
    let Some(v) = v else {
        return Ok(None);
    };
    let n = match &v {
        Value::Number(n) => n,
        other => return Err(wrong_type(name, "an integer", other)),
    };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i128::from(i)));
    }
    if let Some(u) = n.as_u64() {
        return Ok(Some(i128::from(u)));
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 => Ok(Some(f as i128)),
        _ => Err(ApiError::InvalidRequest(format!(
            "field '{name}' must be an integer, not {n}"
        ))),
    }
}

pub(super) fn number(name: &str, v: Option<Value>) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(wrong_type(name, "a number", &other)),
    }
}

/// The hosted contract's success body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GenerateResponse {
    pub success: bool,
    pub images: Vec<ImageDto>,
    pub request_id: String,
    pub credits_used: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImageDto {
    pub url: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

impl GenerateResponse {
    /// `base` is the public base URL without a trailing slash.
    pub fn new(base: &str, g: Generated) -> Self {
        let id = g.request_id.as_str();
        Self {
            success: true,
            images: g
                .images
                .iter()
                .map(|i| ImageDto {
                    url: i
                        .url
                        .clone()
                        .unwrap_or_else(|| format!("{base}/files/gen/{id}/{}", i.file_name)),
                    seed: i.seed,
                    width: g.width,
                    height: g.height,
                })
                .collect(),
            request_id: id.to_string(),
            credits_used: g.credits_used,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<RawRequest, ApiError> {
        match v {
            Value::Object(m) => raw_request(m),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn fields_and_unknowns() {
        let r = parse(
            json!({"prompt": "p", "model": "m", "width": 512.0, "seed": 18446744073709551615u64,
            "guidance_scale": 3, "extra": [1, 2], "quality": null}),
        )
        .unwrap();
        assert_eq!(r.prompt.as_deref(), Some("p"));
        assert_eq!(r.width, Some(512));
        assert_eq!(r.seed, Some(i128::from(u64::MAX)));
        assert_eq!(r.guidance_scale, Some(3.0));
        assert_eq!(r.quality, None);
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, field) in [
            (json!({"prompt": 5}), "prompt"),
            (json!({"model": true}), "model"),
            (json!({"width": "512"}), "width"),
            (json!({"height": 512.5}), "height"),
            (json!({"num_images": [1]}), "num_images"),
            (json!({"seed": "42"}), "seed"),
            (json!({"steps": 8.5}), "steps"),
            (json!({"guidance_scale": "1"}), "guidance_scale"),
            (json!({"output_format": 1}), "output_format"),
            (json!({"resolution": 1}), "resolution"),
            (json!({"quality": {}}), "quality"),
            (json!({"negative_prompt": false}), "negative_prompt"),
        ] {
            match parse(body) {
                Err(ApiError::InvalidRequest(m)) => {
                    assert!(m.contains(&format!("'{field}'")), "{m}")
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn huge_integers_saturate_for_range_checks() {
        let r = parse(json!({"width": 1e39, "seed": -5})).unwrap();
        assert_eq!(r.width, Some(i128::MAX));
        assert_eq!(r.seed, Some(-5));
    }
}
