//! Images in an S3-compatible bucket (`--store s3://BUCKET[/PREFIX]`), through `object_store`:
//! `PREFIX/gen/<request_id>/image_<i>.<ext>`, the same names as on disk, so any server that
//! shares the bucket serves any image. Endpoint, region and credentials come from the standard
//! `AWS_*` variables (`AWS_ENDPOINT_URL` for MinIO, RustFS, Ceph, R2...).

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, ObjectStore, PutOptions, PutPayload,
};
use tokio::io::AsyncRead;

use super::{RequestId, StoreError};

/// The bucket (and key prefix) images go to.
#[derive(Debug, Clone)]
pub struct S3Images {
    s3: Arc<AmazonS3>,
    bucket: String,
    /// `""` or `"some/prefix"` (no slash at either end).
    prefix: String,
}

impl S3Images {
    /// `s3://BUCKET[/PREFIX]`, configured from the `AWS_*` environment variables.
    pub fn from_env(location: &str) -> Result<Self, StoreError> {
        let rest = location.strip_prefix("s3://").ok_or_else(|| {
            StoreError::Config(format!("'{location}' is not s3://BUCKET[/PREFIX]"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config(format!("'{location}' names no bucket")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // A plain-http endpoint (a bucket server on the same network) is what was asked for.
        if std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://")) {
            builder = builder.with_allow_http(true);
        }
        let s3 = builder
            .build()
            .map_err(|e| StoreError::Config(format!("S3 store {location}: {e}")))?;
        Ok(Self {
            s3: Arc::new(s3),
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// Check that the bucket answers (at start: a wrong endpoint or key fails there, not at the
    /// first request).
    pub async fn check(&self) -> Result<(), StoreError> {
        let prefix = self.gen_prefix();
        let mut listing = self.s3.list(Some(&prefix));
        match listing.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(StoreError::S3(format!("bucket '{}': {e}", self.bucket))),
        }
    }

    fn gen_prefix(&self) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from("gen")
        } else {
            ObjectPath::from(format!("{}/gen", self.prefix))
        }
    }

    fn path(&self, id: &str, name: &str) -> ObjectPath {
        self.gen_prefix().child(id).child(name)
    }

    /// Upload a request's encoded images; on error none of them is left.
    pub async fn put(
        &self,
        id: &RequestId,
        files: Vec<(String, Vec<u8>)>,
        content_type: &'static str,
    ) -> Result<(), StoreError> {
        let mut written = Vec::new();
        for (name, bytes) in files {
            let path = self.path(id.as_str(), &name);
            let mut attributes = Attributes::new();
            attributes.insert(Attribute::ContentType, content_type.into());
            attributes.insert(
                Attribute::CacheControl,
                "public, max-age=31536000, immutable".into(),
            );
            let options = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            let put = self
                .s3
                .put_opts(&path, PutPayload::from(bytes), options)
                .await;
            if let Err(e) = put {
                for p in &written {
                    let _ = self.s3.delete(p).await;
                }
                return Err(StoreError::S3(format!("uploading {path}: {e}")));
            }
            written.push(path);
        }
        Ok(())
    }

    /// Size and last modification of a stored image, `None` if it is not there.
    pub async fn head(&self, id: &str, name: &str) -> Option<(u64, Option<SystemTime>)> {
        match self.s3.head(&self.path(id, name)).await {
            Ok(meta) => Some((meta.size, Some(SystemTime::from(meta.last_modified)))),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!("S3 store: HEAD {id}/{name}: {e}");
                None
            }
        }
    }

    /// The bytes of an image from `start` on, streamed as the reader is read.
    pub async fn read_from(
        &self,
        id: &str,
        name: &str,
        start: u64,
    ) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        let options = GetOptions {
            range: (start > 0).then_some(GetRange::Offset(start)),
            ..GetOptions::default()
        };
        let got = self
            .s3
            .get_opts(&self.path(id, name), options)
            .await
            .map_err(io::Error::other)?;
        let stream = got.into_stream().map_err(io::Error::other).boxed();
        Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
    }

    /// A presigned GET URL of an image, valid for `ttl`.
    pub async fn presign(&self, id: &str, name: &str, ttl: Duration) -> Result<String, StoreError> {
        self.s3
            .signed_url(http::Method::GET, &self.path(id, name), ttl)
            .await
            .map(|u| u.to_string())
            .map_err(|e| StoreError::S3(format!("presigning {id}/{name}: {e}")))
    }

    /// Delete the images older than `max_age` (retention). Returns how many requests' images
    /// were deleted.
    pub async fn remove_older_than(&self, max_age: Duration) -> Result<usize, StoreError> {
        let cutoff = chrono::Duration::from_std(max_age)
            .ok()
            .and_then(|age| chrono::Utc::now().checked_sub_signed(age));
        let Some(cutoff) = cutoff else {
            return Ok(0);
        };
        let old: Vec<ObjectPath> = self
            .s3
            .list(Some(&self.gen_prefix()))
            .try_filter_map(move |meta| async move {
                Ok::<_, object_store::Error>((meta.last_modified < cutoff).then_some(meta.location))
            })
            .try_collect()
            .await
            .map_err(|e| StoreError::S3(format!("listing for retention: {e}")))?;
        let mut requests: Vec<String> = Vec::new();
        for path in old {
            // Only what the store made: gen/<request_id>/image_N.ext.
            let parts: Vec<_> = path.parts().collect();
            let Some(id) = parts.iter().rev().nth(1).map(|p| p.as_ref().to_string()) else {
                continue;
            };
            if RequestId::parse(&id).is_none() {
                continue;
            }
            self.s3
                .delete(&path)
                .await
                .map_err(|e| StoreError::S3(format!("deleting {path}: {e}")))?;
            if !requests.contains(&id) {
                requests.push(id);
            }
        }
        Ok(requests.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn objects_have_the_file_store_names_under_the_prefix() {
        let with = S3Images::from_env("s3://images/team/a/").unwrap();
        assert_eq!(with.bucket, "images");
        assert_eq!(
            with.path("req_x", "image_0.jpg").as_ref(),
            "team/a/gen/req_x/image_0.jpg"
        );
        let without = S3Images::from_env("s3://images").unwrap();
        assert_eq!(
            without.path("req_x", "image_1.png").as_ref(),
            "gen/req_x/image_1.png"
        );
    }

    #[test]
    fn locations_must_name_a_bucket() {
        for bad in ["", "bucket", "s3://", "s3:///prefix", "file:///tmp"] {
            assert!(
                matches!(S3Images::from_env(bad), Err(StoreError::Config(_))),
                "{bad}"
            );
        }
    }
}
