//! The object tier: an S3-compatible object store (`s3://bucket/optional/prefix`), through the
//! `object_store` crate.
//!
//! Credentials, region and endpoint come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, ...) and, for what the environment does not set,
//! from the standard profile files (`~/.aws/credentials`, `~/.aws/config`, the profile named by
//! `AWS_PROFILE` or `default`), which `object_store` does not read itself. The CLI's
//! `--s3-endpoint` overrides both.
//!
//! The tier is blocking: it owns a small tokio runtime and runs each request with
//! `Runtime::block_on` on the caller's thread (several plain threads may call at once; a
//! multi-thread runtime's `block_on` takes `&self` and its I/O driver runs on its own workers).
//! A dead or stalled server fails fast: a short connect timeout, a stall timeout, two retries
//! within a few seconds, then [`TierError::Unavailable`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, PutResult, RetryConfig, UpdateVersion,
};
use tokio::runtime::Runtime;

use super::{ObjectMeta, Tier, TierError, TierResult, Version};

/// Objects up to this size are written with one PUT; larger ones by multipart upload in parts
/// of this size.
const PART_SIZE: u64 = 8 << 20;
/// Parts of a multipart upload in flight at once (one more is being read meanwhile).
const PARTS_IN_FLIGHT: usize = 2;
/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request may wait for the response head (its whole body sent) or for the next
/// bytes of a response body: a stalled server is given up after this.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Retries of a failed request, and the time after its first attempt within which they start.
const RETRIES: usize = 2;
const RETRY_WINDOW: Duration = Duration::from_secs(5);
/// The region when neither the environment nor the profile files name one.
const DEFAULT_REGION: &str = "us-east-1";
/// The largest AWS profile file read.
const MAX_PROFILE_FILE: u64 = 1 << 20;

/// An S3-compatible object store as a [`Tier`]: keys are stored under the URL's prefix.
pub struct ObjectTier {
    /// The URL as the user gave it.
    url: String,
    /// The prefix keys are stored under (no leading or trailing `/`; empty: the bucket root).
    root: String,
    store: AmazonS3,
    runtime: Runtime,
}

impl ObjectTier {
    /// Opens the tier at `url` (`s3://bucket/optional/prefix`), with credentials, region and
    /// endpoint from the environment and the AWS profile files (the environment wins), and
    /// `endpoint` (`--s3-endpoint`) overriding both. An `http://` endpoint is allowed; with an
    /// endpoint, requests are path-style (`ENDPOINT/bucket/key`). Nothing is contacted yet.
    pub fn open(url: &str, endpoint: Option<&str>) -> TierResult<ObjectTier> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Self::open_with(url, endpoint, &env)
    }

    /// [`ObjectTier::open`] with the environment given (the tests' own, not the process's).
    fn open_with(
        url: &str,
        endpoint: Option<&str>,
        env: &[(String, String)],
    ) -> TierResult<ObjectTier> {
        let invalid = |why: String| TierError::Unavailable {
            tier: url.to_string(),
            key: "the bucket".to_string(),
            why,
        };
        let (bucket, root) = parse_url(url).map_err(invalid)?;
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };

        // reqwest is built without a TLS crypto provider of its own (Cargo.toml): ring is the
        // process's. An error means one is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_read_timeout(STALL_TIMEOUT)
            .with_timeout_disabled();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: RETRIES,
            retry_timeout: RETRY_WINDOW,
        };
        let mut builder = AmazonS3Builder::new()
            .with_client_options(options)
            .with_retry(retry);
        // What `AmazonS3Builder::from_env` does, from `env`.
        for (key, value) in env {
            if key.starts_with("AWS_")
                && let Ok(config) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                builder = builder.with_config(config, value);
            }
        }

        let profile = Profile::load(env).map_err(invalid)?;
        let has = |b: &AmazonS3Builder, key| b.get_config_value(&key).is_some();
        if !has(&builder, AmazonS3ConfigKey::AccessKeyId)
            && !has(&builder, AmazonS3ConfigKey::SecretAccessKey)
            && let (Some(id), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key)
        {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = &profile.session_token {
                builder = builder.with_token(token);
            }
        }
        if !has(&builder, AmazonS3ConfigKey::Region) {
            builder = builder.with_region(profile.region.as_deref().unwrap_or(DEFAULT_REGION));
        }
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint))
            .or(profile.endpoint_url);
        if let Some(endpoint) = &endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint)
                .with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
        }
        let store = builder
            .with_bucket_name(bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("supervise-s3")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("cannot start the S3 client's threads: {e}")))?;
        Ok(ObjectTier {
            url: url.to_string(),
            root,
            store,
            runtime,
        })
    }

    /// Runs `future` to completion on the tier's runtime, from the caller's (non-async) thread.
    fn block_on<F: Future>(&self, key: &str, future: F) -> TierResult<F::Output> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(self.unavailable(key, "called from inside an async runtime".into()));
        }
        Ok(self.runtime.block_on(future))
    }

    /// The store's path of `key`.
    fn path(&self, key: &str) -> TierResult<Path> {
        let full = if self.root.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.root)
        };
        Path::parse(&full)
            .ok()
            .filter(|p| !key.is_empty() && p.as_ref() == full)
            .ok_or_else(|| self.unavailable(key, "not a valid object key".into()))
    }

    fn unavailable(&self, key: &str, why: String) -> TierError {
        TierError::Unavailable {
            tier: self.url.clone(),
            key: key.to_string(),
            why,
        }
    }

    /// The tier's error for the store's.
    fn error(&self, key: &str, error: object_store::Error) -> TierError {
        let (tier, key) = (self.url.clone(), key.to_string());
        match error {
            object_store::Error::NotFound { .. } => TierError::NotFound { tier, key },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => TierError::Conflict { tier, key },
            other => TierError::Unavailable {
                tier,
                key,
                why: other.to_string(),
            },
        }
    }

    /// The version a write returned.
    fn version(&self, key: &str, result: PutResult) -> TierResult<Version> {
        result
            .e_tag
            .map(Version)
            .ok_or_else(|| self.unavailable(key, "the store returned no ETag".into()))
    }

    /// A conditional write of a small object.
    fn put_mode(&self, key: &str, bytes: &[u8], mode: PutMode) -> TierResult<PutResult> {
        let path = self.path(key)?;
        let payload = PutPayload::from(bytes.to_vec());
        let put = self.store.put_opts(&path, payload, PutOptions::from(mode));
        self.block_on(key, put)?.map_err(|e| self.error(key, e))
    }

    /// Reads exactly `len` bytes of `data` for `key` (the source's errors and a length other
    /// than announced are [`TierError::Unavailable`]: nothing was written).
    fn read_part(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Vec<u8>> {
        let mut buf = Vec::with_capacity(len as usize);
        let got = data
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| self.unavailable(key, format!("reading the data to upload: {e}")))?;
        if got as u64 != len {
            return Err(self.unavailable(
                key,
                format!("the data to upload ended {} bytes short", len - got as u64),
            ));
        }
        Ok(buf)
    }

    /// Checks that `data` has nothing after the announced length.
    fn check_end(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<()> {
        let mut extra = [0u8; 1];
        let more = read_retrying(data, &mut extra)
            .map_err(|e| self.unavailable(key, format!("reading the data to upload: {e}")))?;
        if more != 0 {
            return Err(self.unavailable(
                key,
                format!("the data to upload is longer than the {len} bytes announced"),
            ));
        }
        Ok(())
    }

    /// Writes `len` bytes of `data` by multipart upload, `PART_SIZE` at a time, at most
    /// `PARTS_IN_FLIGHT` parts uploading while the next is read; aborted on failure.
    fn put_multipart(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version> {
        let path = self.path(key)?;
        let mut upload = self
            .block_on(key, self.store.put_multipart(&path))?
            .map_err(|e| self.error(key, e))?;
        let mut in_flight = VecDeque::new();
        let parts = (|| -> TierResult<()> {
            let mut left = len;
            while left > 0 {
                let part = self.read_part(key, data, left.min(PART_SIZE))?;
                left -= part.len() as u64;
                if in_flight.len() >= PARTS_IN_FLIGHT
                    && let Some(oldest) = in_flight.pop_front()
                {
                    self.join_part(key, oldest)?;
                }
                let put = upload.put_part(PutPayload::from(part));
                in_flight.push_back(self.runtime.spawn(put));
            }
            self.check_end(key, data, len)?;
            while let Some(oldest) = in_flight.pop_front() {
                self.join_part(key, oldest)?;
            }
            Ok(())
        })();
        let error = match parts {
            Ok(()) => match self.block_on(key, upload.complete()) {
                Ok(Ok(done)) => return self.version(key, done),
                Ok(Err(e)) => self.error(key, e),
                Err(e) => e,
            },
            Err(e) => e,
        };
        // Let the parts still uploading finish (each bounded by the timeouts), then abort, so
        // that the store does not keep them; the first error is the one reported.
        while let Some(part) = in_flight.pop_front() {
            let _ = self.join_part(key, part);
        }
        let _ = self.block_on(key, upload.abort());
        Err(error)
    }

    /// Waits for one uploading part.
    fn join_part(
        &self,
        key: &str,
        part: tokio::task::JoinHandle<object_store::Result<()>>,
    ) -> TierResult<()> {
        match self.block_on(key, part)? {
            Ok(done) => done.map_err(|e| self.error(key, e)),
            Err(e) => Err(self.unavailable(key, format!("a part upload failed: {e}"))),
        }
    }
}

impl Tier for ObjectTier {
    fn describe(&self) -> &str {
        &self.url
    }

    fn list(&self, prefix: &str) -> TierResult<Vec<ObjectMeta>> {
        // The store lists whole path segments: list the prefix's directory, keep what matches.
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let location = match (self.root.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Path::from(self.root.as_str())),
            _ => Some(self.path(dir)?),
        };
        let strip = if self.root.is_empty() {
            String::new()
        } else {
            format!("{}/", self.root)
        };
        let mut stream = self.store.list(location.as_ref());
        let mut found = Vec::new();
        while let Some(next) = self.block_on(prefix, stream.next())? {
            let meta = next.map_err(|e| self.error(prefix, e))?;
            let Some(key) = meta.location.as_ref().strip_prefix(&strip) else {
                continue;
            };
            if key.starts_with(prefix) {
                found.push(ObjectMeta {
                    key: key.to_string(),
                    size: meta.size,
                    modified_unix_ms: u64::try_from(meta.last_modified.timestamp_millis())
                        .unwrap_or(0),
                });
            }
        }
        Ok(found)
    }

    fn get(&self, key: &str, out: &mut dyn Write, max: u64) -> TierResult<Version> {
        let path = self.path(key)?;
        let response = self
            .block_on(key, self.store.get_opts(&path, GetOptions::default()))?
            .map_err(|e| self.error(key, e))?;
        let size = response.meta.size;
        if size > max {
            return Err(TierError::TooLarge {
                tier: self.url.clone(),
                key: key.to_string(),
                max,
            });
        }
        let version = response
            .meta
            .e_tag
            .clone()
            .map(Version)
            .ok_or_else(|| self.unavailable(key, "the store returned no ETag".into()))?;
        let mut stream = response.into_stream();
        let mut received = 0u64;
        while let Some(chunk) = self.block_on(key, stream.next())? {
            let chunk = chunk.map_err(|e| self.error(key, e))?;
            received += chunk.len() as u64;
            if received > size {
                break;
            }
            out.write_all(&chunk)
                .map_err(|e| self.unavailable(key, format!("writing what was read: {e}")))?;
        }
        if received != size {
            return Err(TierError::Damaged {
                tier: self.url.clone(),
                key: key.to_string(),
                why: format!("the store announced {size} bytes and sent {received} or more"),
            });
        }
        Ok(version)
    }

    fn put(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version> {
        if len > PART_SIZE {
            return self.put_multipart(key, data, len);
        }
        let bytes = self.read_part(key, data, len)?;
        self.check_end(key, data, len)?;
        let result = self.put_mode(key, &bytes, PutMode::Overwrite)?;
        self.version(key, result)
    }

    fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
        let result = self.put_mode(key, bytes, PutMode::Create)?;
        self.version(key, result)
    }

    fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version> {
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(version.0.clone()),
            version: None,
        });
        match self.put_mode(key, bytes, mode) {
            Ok(result) => self.version(key, result),
            // If-Match on a removed object: S3 answers 404.
            Err(TierError::NotFound { tier, key }) => Err(TierError::Conflict { tier, key }),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, key: &str) -> TierResult<()> {
        let path = self.path(key)?;
        match self.block_on(key, self.store.delete(&path))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }
}

/// Reads into `buf`, retrying when interrupted.
fn read_retrying(data: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match data.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The bucket and the prefix (no leading or trailing `/`) of `s3://bucket/optional/prefix`.
fn parse_url(url: &str) -> Result<(String, String), String> {
    let expected = "expected s3://bucket or s3://bucket/prefix";
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("not an S3 URL ({expected})"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(format!(
            "'{bucket}' is not a bucket name (3 to 63 of a-z 0-9 . -; {expected})"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        let valid = Path::parse(prefix).is_ok_and(|p| p.as_ref() == prefix);
        if !valid {
            return Err(format!("'{prefix}' is not a valid key prefix ({expected})"));
        }
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// What the AWS profile files say for the chosen profile (the credentials file first).
#[derive(Debug, Default, PartialEq, Eq)]
struct Profile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
}

impl Profile {
    /// The profile `AWS_PROFILE` (or `default`) from `AWS_SHARED_CREDENTIALS_FILE` (or
    /// `~/.aws/credentials`) and `AWS_CONFIG_FILE` (or `~/.aws/config`). Missing files are
    /// empty; a profile named by `AWS_PROFILE` and found in neither file is an error.
    fn load(env: &[(String, String)]) -> Result<Profile, String> {
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let home = var("HOME").map(PathBuf::from);
        let file = |name: &str, default: &str| {
            var(name)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let named = var("AWS_PROFILE");
        let name = named.clone().unwrap_or_else(|| "default".to_string());
        let mut profile = Profile::default();
        let mut found = false;
        if let Some(path) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
            && let Some(text) = read_profile_file(&path)?
        {
            found |= profile.merge(&text, &name);
        }
        if let Some(path) = file("AWS_CONFIG_FILE", "config")
            && let Some(text) = read_profile_file(&path)?
        {
            found |= profile.merge(&text, &format!("profile {name}"));
            if name == "default" {
                found |= profile.merge(&text, "default");
            }
        }
        match named {
            Some(name) if !found => Err(format!(
                "AWS_PROFILE names the profile '{name}', which no AWS profile file has"
            )),
            _ => Ok(profile),
        }
    }

    /// Takes the values this profile does not have yet from the section `[section]` of `text`
    /// (an INI file: `key = value` lines; `#` and `;` comment lines; indented lines belong to a
    /// nested setting and are skipped). True when the section is there.
    fn merge(&mut self, text: &str, section: &str) -> bool {
        let mut inside = false;
        let mut found = false;
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if let Some(name) = trimmed.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
                inside = name == section;
                found |= inside;
                continue;
            }
            if !inside || line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                continue;
            };
            let value = value.trim();
            let slot = match key.trim().to_ascii_lowercase().as_str() {
                "aws_access_key_id" => &mut self.access_key_id,
                "aws_secret_access_key" => &mut self.secret_access_key,
                "aws_session_token" => &mut self.session_token,
                "region" => &mut self.region,
                "endpoint_url" => &mut self.endpoint_url,
                _ => continue,
            };
            if slot.is_none() && !value.is_empty() {
                *slot = Some(value.to_string());
            }
        }
        found
    }
}

/// A profile file's text (`None`: no such file), at most `MAX_PROFILE_FILE` bytes.
fn read_profile_file(path: &FsPath) -> Result<Option<String>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PROFILE_FILE {
        return Err(format!(
            "{} is larger than {MAX_PROFILE_FILE} bytes: not an AWS profile file",
            path.display()
        ));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/supervise/s3_server.rs"]
mod s3_server;

#[cfg(test)]
mod tests {
    use super::s3_server::S3Server;
    use super::*;
    use std::time::Instant;

    fn tier(server: &S3Server, prefix: &str) -> ObjectTier {
        ObjectTier::open_with(&server.url(prefix), None, &server.env()).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The byte at offset `i` of a generated object.
    fn byte(i: u64) -> u8 {
        (i.wrapping_mul(2_654_435_761) >> 13) as u8
    }

    /// `len` generated bytes, made as they are read (nothing held in memory).
    struct Generated {
        pos: u64,
        len: u64,
    }

    impl Read for Generated {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = (buf.len() as u64).min(self.len - self.pos) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = byte(self.pos + i as u64);
            }
            self.pos += n as u64;
            Ok(n)
        }
    }

    /// Checks written bytes against the generated ones as they come.
    #[derive(Default)]
    struct Check {
        pos: u64,
        first_wrong: Option<u64>,
    }

    impl Write for Check {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            for (i, b) in buf.iter().enumerate() {
                let at = self.pos + i as u64;
                if *b != byte(at) && self.first_wrong.is_none() {
                    self.first_wrong = Some(at);
                }
            }
            self.pos += buf.len() as u64;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn objects_round_trip_small_and_multipart_and_list_under_the_prefix() {
        let server = S3Server::start();
        let t = tier(&server, "runs/a");
        assert_eq!(t.describe(), "s3://supervise-test/runs/a");

        let v = t.put_bytes("heat/lease", b"holder").unwrap();
        let (bytes, got) = t.get_bytes("heat/lease", 100).unwrap();
        assert_eq!((bytes.as_slice(), &got), (&b"holder"[..], &v));
        t.put_bytes("heat/empty", b"").unwrap();
        assert_eq!(t.get_bytes("heat/empty", 0).unwrap().0, b"");

        // 20 MiB: three parts, generated and checked as they stream.
        let len = 20 << 20;
        let v = t
            .put("heat/packs/big.pack", &mut Generated { pos: 0, len }, len)
            .unwrap();
        let mut check = Check::default();
        assert_eq!(t.get("heat/packs/big.pack", &mut check, len).unwrap(), v);
        assert_eq!((check.pos, check.first_wrong), (len, None));

        // Several threads at once.
        std::thread::scope(|s| {
            for i in 0..4 {
                let t = &t;
                s.spawn(move || {
                    let key = format!("heat/packs/p{i}.pack");
                    let body = vec![i as u8; 1000 + i];
                    t.put_bytes(&key, &body).unwrap();
                    assert_eq!(t.get_bytes(&key, 1 << 20).unwrap().0, body);
                });
            }
        });

        let missing = t.get_bytes("heat/packs/none.pack", 100).unwrap_err();
        assert!(matches!(missing, TierError::NotFound { .. }), "{missing}");
        let mut out = Vec::new();
        let large = t.get("heat/lease", &mut out, 5).unwrap_err();
        assert!(
            matches!(large, TierError::TooLarge { max: 5, .. }),
            "{large}"
        );
        assert!(out.is_empty());

        let mut packs = t.list("heat/packs/").unwrap();
        packs.sort_by(|a, b| a.key.cmp(&b.key));
        let sizes: Vec<_> = packs.iter().map(|m| (m.key.as_str(), m.size)).collect();
        assert_eq!(
            sizes,
            [
                ("heat/packs/big.pack", len),
                ("heat/packs/p0.pack", 1000),
                ("heat/packs/p1.pack", 1001),
                ("heat/packs/p2.pack", 1002),
                ("heat/packs/p3.pack", 1003),
            ]
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            packs
                .iter()
                .all(|m| m.modified_unix_ms.abs_diff(now) < 600_000)
        );
        assert_eq!(t.list("heat/packs/p").unwrap().len(), 4);
        assert_eq!(t.list("heat/").unwrap().len(), 7);
        assert_eq!(t.list("he").unwrap().len(), 7);
        assert_eq!(t.list("heat/x").unwrap(), []);

        // The keys are under the URL's prefix.
        let root = tier(&server, "");
        let mut all: Vec<_> = root.list("").unwrap().into_iter().map(|m| m.key).collect();
        all.sort();
        assert_eq!(all.len(), 7);
        assert!(all.iter().all(|k| k.starts_with("runs/a/heat/")), "{all:?}");
        assert_eq!(
            root.get_bytes("runs/a/heat/lease", 100).unwrap().0,
            b"holder"
        );
        assert_eq!(tier(&server, "runs/b").list("").unwrap(), []);

        t.delete("heat/lease").unwrap();
        let gone = t.get_bytes("heat/lease", 100).unwrap_err();
        assert!(matches!(gone, TierError::NotFound { .. }), "{gone}");
        t.delete("heat/lease").unwrap();

        // Data shorter or longer than announced writes nothing.
        for (given, said) in [
            (10, 11),
            (12, 11),
            (9 << 20, 10 << 20),
            (17 << 20, 16 << 20),
        ] {
            let key = format!("heat/wrong-{given}-{said}");
            let e = t
                .put(&key, &mut Generated { pos: 0, len: given }, said)
                .unwrap_err();
            assert!(matches!(e, TierError::Unavailable { .. }), "{e}");
            assert!(e.to_string().contains(&key), "{e}");
            let absent = t.get_bytes(&key, 1 << 30).unwrap_err();
            assert!(matches!(absent, TierError::NotFound { .. }), "{absent}");
        }
    }

    #[test]
    fn conditional_writes_conflict_when_someone_else_wrote() {
        let server = S3Server::start();
        let t = tier(&server, "cas");
        let v1 = t.create("job/lease", b"one").unwrap();
        let again = t.create("job/lease", b"two").unwrap_err();
        assert!(matches!(again, TierError::Conflict { .. }), "{again}");

        let v2 = t.replace("job/lease", b"three", &v1).unwrap();
        assert_ne!(v1, v2);
        let stale = t.replace("job/lease", b"four", &v1).unwrap_err();
        assert!(matches!(stale, TierError::Conflict { .. }), "{stale}");
        assert_eq!(
            t.get_bytes("job/lease", 100).unwrap(),
            (b"three".to_vec(), v2.clone())
        );

        t.delete("job/lease").unwrap();
        let removed = t.replace("job/lease", b"five", &v2).unwrap_err();
        assert!(matches!(removed, TierError::Conflict { .. }), "{removed}");
        t.create("job/lease", b"six").unwrap();
    }

    #[test]
    fn credentials_from_a_profile_file_and_the_endpoint_override() {
        let server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        std::fs::write(
            &credentials,
            "[work]\naws_access_key_id = from-file\naws_secret_access_key = secret\n",
        )
        .unwrap();
        // No key in the environment: without the file's, the client would ask the EC2
        // metadata service, which is not here. The environment's endpoint is a dead port;
        // the one given wins.
        let vars = env(&[
            ("AWS_PROFILE", "work"),
            ("AWS_SHARED_CREDENTIALS_FILE", credentials.to_str().unwrap()),
            ("AWS_CONFIG_FILE", "/nonexistent/config"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ]);
        let url = server.url("p");
        let t = ObjectTier::open_with(&url, Some(&server.endpoint), &vars).unwrap();
        let v = t.put_bytes("k", b"v").unwrap();
        assert_eq!(t.get_bytes("k", 10).unwrap(), (b"v".to_vec(), v));
    }

    #[test]
    fn a_stopped_or_paused_server_is_unavailable_within_bounded_time() {
        let mut server = S3Server::start();
        let t = tier(&server, "gone");
        let v = t.put_bytes("job/lease", b"held").unwrap();

        server.pause();
        let start = Instant::now();
        std::thread::scope(|s| {
            let get = s.spawn(|| t.get_bytes("job/lease", 100));
            let put = s.spawn(|| t.put_bytes("job/other", b"x"));
            for result in [
                get.join().unwrap().map(|_| ()),
                put.join().unwrap().map(|_| ()),
            ] {
                let e = result.unwrap_err();
                assert!(e.is_transient(), "{e}");
                assert!(e.to_string().contains("s3://supervise-test/gone"), "{e}");
            }
        });
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        server.resume();
        assert_eq!(
            t.get_bytes("job/lease", 100).unwrap(),
            (b"held".to_vec(), v)
        );

        server.stop();
        let start = Instant::now();
        let e = t.list("job/").unwrap_err();
        assert!(matches!(e, TierError::Unavailable { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );

        // A restarted moto has the bucket again but not the objects.
        server.restart();
        let e = t.get_bytes("job/lease", 100).unwrap_err();
        assert!(matches!(e, TierError::NotFound { .. }), "{e}");
    }

    #[test]
    fn bad_urls_are_errors_naming_them() {
        for url in [
            "http://bucket/x",
            "bucket/x",
            "s3://",
            "s3://ab",
            "s3://Upper-Case",
            "s3://bucket name",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
        ] {
            let e = match ObjectTier::open_with(url, None, &[]) {
                Ok(_) => panic!("{url} was accepted"),
                Err(e) => e,
            };
            assert!(e.to_string().contains(url), "{url}: {e}");
        }
        let t = ObjectTier::open_with("s3://bucket/a/b/", Some("http://127.0.0.1:9"), &[]).unwrap();
        assert_eq!(t.root, "a/b");
        for key in ["", "a//b", "a/../b", "/a"] {
            let e = t.delete(key).unwrap_err();
            assert!(
                e.to_string().contains("not a valid object key"),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn profile_files_are_read_env_and_credentials_first() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "# comment\n[default]\naws_access_key_id=AKDEFAULT\naws_secret_access_key = sd\n\n\
             [work]\n; comment\naws_access_key_id = AKWORK\naws_secret_access_key = sw\n\
             aws_session_token = tok\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = eu-west-1\n\n[profile work]\nregion = eu-north-1\n\
             aws_access_key_id = AKCONFIG\ns3 =\n  endpoint_url = http://nested\n\
             endpoint_url = http://store:9000\n[profile  other ]\nregion=ap-south-1\n",
        )
        .unwrap();
        let home = dir.path().to_str().unwrap();

        let default = Profile::load(&env(&[("HOME", home)])).unwrap();
        assert_eq!(
            default,
            Profile {
                access_key_id: Some("AKDEFAULT".into()),
                secret_access_key: Some("sd".into()),
                session_token: None,
                region: Some("eu-west-1".into()),
                endpoint_url: None,
            }
        );
        let work = Profile::load(&env(&[("HOME", home), ("AWS_PROFILE", "work")])).unwrap();
        assert_eq!(
            work,
            Profile {
                access_key_id: Some("AKWORK".into()),
                secret_access_key: Some("sw".into()),
                session_token: Some("tok".into()),
                region: Some("eu-north-1".into()),
                endpoint_url: Some("http://store:9000".into()),
            }
        );
        let other = Profile::load(&env(&[("HOME", home), ("AWS_PROFILE", "other")])).unwrap();
        assert_eq!(other.region.as_deref(), Some("ap-south-1"));
        assert_eq!(other.access_key_id, None);

        let e = Profile::load(&env(&[("HOME", home), ("AWS_PROFILE", "nobody")])).unwrap_err();
        assert!(e.contains("nobody"), "{e}");
        assert_eq!(Profile::load(&[]).unwrap(), Profile::default());

        // The files named by the environment instead of ~/.aws.
        let moved = dir.path().join("creds");
        std::fs::write(&moved, "[default]\naws_access_key_id = MOVED\n").unwrap();
        let p = Profile::load(&env(&[
            ("HOME", home),
            ("AWS_SHARED_CREDENTIALS_FILE", moved.to_str().unwrap()),
            ("AWS_CONFIG_FILE", "/nonexistent"),
        ]))
        .unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("MOVED"));
        assert_eq!(p.region, None);

        // Bounded: a huge file is refused, not read.
        let huge = dir.path().join("huge");
        std::fs::write(&huge, vec![b'#'; (MAX_PROFILE_FILE + 1) as usize]).unwrap();
        let e = Profile::load(&env(&[("AWS_CONFIG_FILE", huge.to_str().unwrap())])).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }
}
