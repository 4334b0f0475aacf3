//! `cargo xtask image`: knd's container image, assembled here without pulling anything.
//!
//! The image is built `FROM scratch` in one layer: the `knd` binary, exactly the shared
//! libraries `ldd` says it loads (with the dynamic loader at the path the binary names), the
//! PCI names database and the CA bundle. No shell, no package manager, nothing else. The same
//! function assembles the files for the OCI archive and for `deploy/Dockerfile` (whose build
//! stage runs `cargo xtask image --rootfs /rootfs`), so the two cannot drift apart.
//!
//! The archive is reproducible: entries sorted, owners 0, modification times fixed (to
//! `SOURCE_DATE_EPOCH` when set, else 0), gzip without a timestamp and JSON with sorted keys;
//! the same binary gives the same digest.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder,
};
use serde::Deserialize as _;
use sha2::{Digest as _, Sha256};

/// Where the binary lives in the image.
pub(crate) const BINARY: &str = "/usr/local/bin/knd";
/// The image's entrypoint and default arguments (the DaemonSet passes `args: ["run"]` too).
pub(crate) const ENTRYPOINT: [&str; 1] = [BINARY];
pub(crate) const CMD: [&str; 1] = ["run"];
/// knd runs as root with a handful of capabilities: Kubernetes grants added capabilities to a
/// non-root user only in its bounding set, never in its effective set (no ambient capabilities),
/// so a non-root knd could do none of its work.
pub(crate) const USER: &str = "0:0";
/// Files taken from the build machine as they are, with why the image needs them.
const DATA_FILES: [(&str, &str); 2] = [
    (
        "/usr/share/misc/pci.ids",
        "PCI vendor and device names when the node has no pci.ids (Debian package pci.ids)",
    ),
    (
        "/etc/ssl/certs/ca-certificates.crt",
        "the CA bundle for TLS to anything but the API server (whose CA comes with the service \
         account); Debian package ca-certificates",
    ),
];
/// Where `cargo xtask image` writes the archive.
pub(crate) const ARCHIVE: &str = "target/oci/knd.tar";
/// Where `cargo xtask test` writes the image of the test profile's binary.
pub(crate) const DEV_ARCHIVE: &str = "target/oci/knd-dev.tar";

/// One file of the image: its path in the image, where its bytes come from, its mode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct File {
    pub(crate) path: String,
    pub(crate) source: PathBuf,
    pub(crate) mode: u32,
}

/// What `cargo xtask image` built.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) archive: PathBuf,
    pub(crate) reference: String,
    /// The manifest's digest: the image's identity in a registry and in containerd.
    pub(crate) digest: String,
    pub(crate) archive_bytes: u64,
    pub(crate) layer_bytes: u64,
    pub(crate) files: Vec<(String, u64)>,
}

/// The build profile of the binary in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Profile {
    /// Optimised, as shipped.
    Release,
    /// The test profile (unoptimised, faster to build; for the container test).
    Dev,
}

impl Profile {
    fn directory(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Dev => "debug",
        }
    }
}

/// Builds `knd` with `profile` and returns the binary.
pub(crate) fn build_binary(profile: Profile) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--quiet", "--package", "knd", "--bin", "knd"];
    if profile == Profile::Release {
        args.push("--release");
    }
    crate::step("build knd", crate::cargo(&args))?;
    let binary = Path::new("target").join(profile.directory()).join("knd");
    binary
        .canonicalize()
        .with_context(|| format!("{} after the build", binary.display()))
}

/// The image's files for `binary`: the binary, its shared libraries and the data files.
pub(crate) fn files(binary: &Path) -> anyhow::Result<Vec<File>> {
    let mut files = vec![File {
        path: BINARY.to_owned(),
        source: stripped(binary)?,
        mode: 0o755,
    }];
    for library in shared_libraries(binary)? {
        let source = library
            .canonicalize()
            .with_context(|| format!("resolving {}", library.display()))?;
        files.push(File {
            path: library.to_string_lossy().into_owned(),
            source,
            mode: 0o755,
        });
    }
    for (path, why) in DATA_FILES {
        ensure!(
            Path::new(path).is_file(),
            "{path} is missing on this machine; the image needs it for {why}"
        );
        files.push(File {
            path: path.to_owned(),
            source: PathBuf::from(path),
            mode: 0o644,
        });
    }
    files.sort();
    Ok(files)
}

/// A copy of `binary` without its debug sections (the symbol table stays, for backtraces),
/// next to it as `<name>.image`: the build profiles keep line tables for profiling and
/// benchmarks, which the image has no use for.
fn stripped(binary: &Path) -> anyhow::Result<PathBuf> {
    let copy = binary.with_extension("image");
    let output = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&copy)
        .arg(binary)
        .output()
        .context("running strip (Debian package binutils)")?;
    ensure!(
        output.status.success(),
        "strip --strip-debug {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(copy)
}

/// The libraries the dynamic loader maps for `binary`, the loader itself included, as the
/// absolute paths the loader looks them up at (`ldd`'s `=>` targets).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    ensure!(
        output.status.success(),
        "ldd {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = line.split_once("=>").map_or(line, |(_, t)| t.trim());
        if target.starts_with("not found") {
            bail!("ldd: a library the binary needs is missing: {line}");
        }
        let path = target.split(" (").next().unwrap_or_default().trim();
        // The vDSO has no file; everything else the loader maps is named by an absolute path.
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        } else if !line.starts_with("linux-vdso") && !line.starts_with("linux-gate") {
            bail!("ldd: cannot read the line {line:?}");
        }
    }
    Ok(libraries)
}

/// Copies `files` into `dir` (for the Dockerfile's final `FROM scratch` stage).
pub(crate) fn write_rootfs(dir: &Path, files: &[File]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for file in files {
        let target = dir.join(file.path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&file.source, &target).with_context(|| {
            format!("copying {} to {}", file.source.display(), target.display())
        })?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(file.mode))?;
    }
    Ok(())
}

/// The image reference the DaemonSet runs (`deploy/kubernetes/daemonset.yaml`, container
/// `knd`): the archive carries it, so the image imported into a runtime is the one the
/// manifest names.
pub(crate) fn daemonset_reference(root: &Path) -> anyhow::Result<String> {
    let path = root.join("deploy/kubernetes/daemonset.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value["kind"].as_str() != Some("DaemonSet") {
            continue;
        }
        let containers = value["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .context("the DaemonSet has no containers")?;
        for container in containers {
            if container["name"].as_str() == Some("knd") {
                return container["image"]
                    .as_str()
                    .map(str::to_owned)
                    .context("container knd has no image");
            }
        }
    }
    bail!("{} has no DaemonSet with a container knd", path.display())
}

/// Writes the OCI image archive (an OCI image layout in a tar) for `files` to `archive`.
pub(crate) fn write_archive(
    files: &[File],
    reference: &str,
    archive: &Path,
) -> anyhow::Result<Built> {
    let epoch = source_date_epoch()?;
    let layer_tar = layer(files, epoch)?;
    let diff_id = sha256(&layer_tar);
    let mut gzip = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gzip.write_all(&layer_tar)?;
    let layer_gz = gzip.finish()?;
    let config = image_config(&diff_id, epoch)?;
    let config_json = canonical_json(&config)?;
    let layer_descriptor = descriptor(MediaType::ImageLayerGzip, &layer_gz)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2_u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config_json)?)
        .layers(vec![layer_descriptor])
        .build()?;
    let manifest_json = canonical_json(&manifest)?;
    let digest = format!("sha256:{}", sha256(&manifest_json));
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let mut manifest_descriptor = descriptor(MediaType::ImageManifest, &manifest_json)?;
    manifest_descriptor.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()?,
    ));
    manifest_descriptor.set_annotations(Some(std::collections::HashMap::from([
        // containerd's name for the image (`ctr images import` uses it as it is) and the
        // OCI layout's tag.
        ("io.containerd.image.name".to_owned(), reference.to_owned()),
        (
            "org.opencontainers.image.ref.name".to_owned(),
            tag.to_owned(),
        ),
    ])));
    let index = ImageIndexBuilder::default()
        .schema_version(2_u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_descriptor])
        .build()?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    entries.insert("oci-layout".into(), canonical_json(&layout)?);
    entries.insert("index.json".into(), canonical_json(&index)?);
    for blob in [&config_json, &manifest_json, &layer_gz] {
        entries.insert(format!("blobs/sha256/{}", sha256(blob)), blob.clone());
    }
    let mut out = tar::Builder::new(Vec::new());
    for directory in ["blobs", "blobs/sha256"] {
        append(
            &mut out,
            directory,
            tar::EntryType::Directory,
            0o755,
            epoch,
            &[],
        )?;
    }
    for (path, bytes) in &entries {
        append(&mut out, path, tar::EntryType::Regular, 0o644, epoch, bytes)?;
    }
    let bytes = out.into_inner()?;
    if let Some(parent) = archive.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(archive, &bytes).with_context(|| format!("writing {}", archive.display()))?;
    let mut sizes = Vec::new();
    for file in files {
        sizes.push((file.path.clone(), std::fs::metadata(&file.source)?.len()));
    }
    Ok(Built {
        archive: archive.to_path_buf(),
        reference: reference.to_owned(),
        digest,
        archive_bytes: bytes.len() as u64,
        layer_bytes: layer_gz.len() as u64,
        files: sizes,
    })
}

/// The image configuration: how to run knd, and the layer's uncompressed digest.
fn image_config(diff_id: &str, epoch: u64) -> anyhow::Result<oci_spec::image::ImageConfiguration> {
    let created = rfc3339(epoch);

    Ok(ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .user(USER)
                .entrypoint(ENTRYPOINT.map(str::to_owned).to_vec())
                .cmd(CMD.map(str::to_owned).to_vec())
                .labels(std::collections::HashMap::from([(
                    "org.opencontainers.image.title".to_owned(),
                    "knd".to_owned(),
                )]))
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created)
                .created_by("cargo xtask image")
                .build()?,
        ])
        .build()?)
}

/// The layer: every file with its parent directories, sorted, owned by root, at `epoch`.
fn layer(files: &[File], epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut directories = BTreeSet::new();
    for file in files {
        let mut parent = Path::new(&file.path).parent();
        while let Some(directory) = parent.filter(|p| *p != Path::new("/")) {
            directories.insert(
                directory
                    .to_string_lossy()
                    .trim_start_matches('/')
                    .to_owned(),
            );
            parent = directory.parent();
        }
    }
    let mut out = tar::Builder::new(Vec::new());
    for directory in &directories {
        append(
            &mut out,
            directory,
            tar::EntryType::Directory,
            0o755,
            epoch,
            &[],
        )?;
    }
    let mut sorted: Vec<&File> = files.iter().collect();
    sorted.sort();
    for file in sorted {
        let bytes = std::fs::read(&file.source)
            .with_context(|| format!("reading {}", file.source.display()))?;
        let path = file.path.trim_start_matches('/');
        append(
            &mut out,
            path,
            tar::EntryType::Regular,
            file.mode,
            epoch,
            &bytes,
        )?;
    }
    Ok(out.into_inner()?)
}

fn append(
    out: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    epoch: u64,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(epoch);
    header.set_size(bytes.len() as u64);
    let name = if kind == tar::EntryType::Directory {
        format!("{path}/")
    } else {
        path.to_owned()
    };
    out.append_data(&mut header, name, bytes)
        .with_context(|| format!("adding {path} to the tar"))
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> anyhow::Result<Descriptor> {
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .size(bytes.len() as u64)
        .digest(oci_spec::image::Digest::try_from(format!(
            "sha256:{}",
            sha256(bytes)
        ))?)
        .build()?)
}

/// JSON with sorted keys (oci-spec keeps annotations and labels in hash maps).
fn canonical_json(value: &impl serde::Serialize) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            use std::fmt::Write as _;
            let _infallible = write!(hex, "{byte:02x}");
            hex
        })
}

fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// `epoch` as an RFC 3339 UTC time (civil-from-days, proleptic Gregorian).
fn rfc3339(epoch: u64) -> String {
    let days = i64::try_from(epoch / 86_400).unwrap_or(i64::MAX);
    let seconds = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

/// `cargo xtask image`.
pub(crate) fn run(
    root: &Path,
    profile: Profile,
    rootfs: Option<&Path>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let binary = build_binary(profile)?;
    let files = files(&binary)?;
    if let Some(dir) = rootfs {
        write_rootfs(dir, &files)?;
        for file in &files {
            println!("{}", file.path);
        }
        return Ok(());
    }
    let reference = daemonset_reference(root)?;
    let default = match profile {
        Profile::Release => ARCHIVE,
        Profile::Dev => DEV_ARCHIVE,
    };
    let archive = output.map_or_else(|| root.join(default), Path::to_path_buf);
    let built = write_archive(&files, &reference, &archive)?;
    println!("image {} ({:?} build)", built.reference, profile);
    for (path, bytes) in &built.files {
        println!("  {path:<40} {bytes:>10} bytes");
    }
    println!(
        "archive: {} ({:.1} MiB; layer {:.1} MiB compressed)\ndigest: {}",
        built.archive.display(),
        mib(built.archive_bytes),
        mib(built.layer_bytes),
        built.digest
    );
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_read_into_the_loaders_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5e9f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(missing.to_string().contains("libfoo.so.1"), "{missing}");
    }

    #[test]
    fn the_same_files_give_the_same_digest_whatever_their_times() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("knd");
        std::fs::write(&binary, b"\x7fELF not really").unwrap();
        let files = vec![File {
            path: BINARY.into(),
            source: binary.clone(),
            mode: 0o755,
        }];
        let first =
            write_archive(&files, "example.invalid/knd:1", &dir.path().join("a.tar")).unwrap();
        // A later copy of the same bytes: a new modification time, same image.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&binary, b"\x7fELF not really").unwrap();
        let second =
            write_archive(&files, "example.invalid/knd:1", &dir.path().join("b.tar")).unwrap();
        assert_eq!(first.digest, second.digest);
        assert_eq!(
            std::fs::read(dir.path().join("a.tar")).unwrap(),
            std::fs::read(dir.path().join("b.tar")).unwrap()
        );
        std::fs::write(&binary, b"\x7fELF another").unwrap();
        let third =
            write_archive(&files, "example.invalid/knd:1", &dir.path().join("c.tar")).unwrap();
        assert_ne!(first.digest, third.digest, "the digest follows the content");
    }

    #[test]
    fn dates_are_written_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_780_000_000), "2026-05-28T20:26:40Z");
    }
}

#[cfg(test)]
mod dockerfile {
    use super::*;

    /// deploy/Dockerfile builds the same image: its build stage runs this module's file
    /// selection, its final stage is exactly those files on scratch, run the same way.
    #[test]
    fn the_dockerfile_builds_what_cargo_xtask_image_builds() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
        let text = std::fs::read_to_string(&path).unwrap();
        let instructions: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let last_from = instructions
            .iter()
            .rposition(|l| l.starts_with("FROM "))
            .unwrap();
        let build = instructions[..last_from].join("\n");
        assert!(
            build.contains("xtask -- image --rootfs /rootfs"),
            "the build stage must assemble the files with `xtask image --rootfs`:\n{build}"
        );
        for (file, _) in DATA_FILES {
            let package = match file {
                "/usr/share/misc/pci.ids" => "pci.ids",
                _ => "ca-certificates",
            };
            assert!(
                build.contains(package),
                "{file} needs {package} in the build stage"
            );
        }
        let runtime = &instructions[last_from..];
        let json = |args: &[&str]| serde_json::to_string(args).unwrap();
        assert_eq!(
            runtime,
            [
                "FROM scratch",
                "COPY --from=build /rootfs/ /",
                &format!("USER {USER}"),
                &format!("ENTRYPOINT {}", json(&ENTRYPOINT)),
                &format!("CMD {}", json(&CMD)),
            ],
            "the final stage of {}",
            path.display()
        );
    }
}
