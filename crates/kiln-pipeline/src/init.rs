//! `kiln init MODEL`: a commented `kiln.toml` for a model, with the data files found beside
//! it (`calib.npz`, `data.npz`, `sample.npz`) filled in and every other key shown commented.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The text of a starting `kiln.toml` at `manifest` for `model` (both as given; the model's
/// path is written relative to the manifest's folder). Fails if the model does not load.
pub fn template(model: &Path, manifest: &Path) -> Result<String> {
    let loaded = kiln_graph::load(model, &Default::default()).with_context(|| {
        format!(
            "kiln init: {} is not a model kiln can load",
            model.display()
        )
    })?;
    let specs = loaded.input_specs()?;
    let symbolic = specs.iter().any(|s| s.shape.iter().any(Option::is_none));
    let dir = match manifest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let rel = |p: &Path| -> Result<String> {
        let abs = std::path::absolute(p)?;
        let base = std::path::absolute(&dir)?;
        Ok(kiln_io::fsutil::relative_path(&abs, &base)
            .display()
            .to_string())
    };
    let model_rel = rel(model)?;
    let beside = |f: &str| model.parent().map(|d| d.join(f)).filter(|p| p.is_file());
    let line = |key: &str, file: Option<PathBuf>, what: &str| -> Result<String> {
        Ok(match file {
            Some(p) => format!("{key} = \"{}\"   # {what}\n", rel(&p)?),
            None => format!("# {key} = \"{key}.npz\"   # {what}\n"),
        })
    };
    let calib = beside("calib.npz");
    let eval = beside("data.npz");
    let name = kiln_graph::load::model_stem(model);
    let mut t = String::new();
    t += "# kiln.toml: the pipeline `kiln build` runs (optimize, compile per target, sign).\n";
    t += "# Every key is described in docs/kiln-toml.md; paths are relative to this file.\n";
    t += "# `kiln plan` shows what would run and why; outputs go to target/kiln/ here.\n\n";
    t += "# Artifact version: devices refuse an artifact not newer than the installed one.\n";
    t += "version = 1\n\n";
    t += "# Targets to compile and package for (`kiln targets` lists them).\n";
    t += "targets = [\"x86_64-linux\", \"aarch64-linux\"]\n\n";
    t += "# Devices to benchmark on: local, qemu-aarch64, qemu-armv7, ssh://[user@]host[:port].\n";
    t += "devices = [\"local\"]\n\n";
    t += "# Ship the runner inside each artifact.\n# with_runner = false\n\n";
    t += "[sign]\n";
    t += "# The private signing key (`kiln keygen -o signer.pem`): never the key itself.\n";
    t += "# `env` names a variable holding the key's path or its PEM text (CI secrets);\n";
    t += "# `path` is a file relative to this manifest (keep it mode 600, out of git).\n";
    t += "key = { env = \"KILN_SIGNING_KEY\" }\n";
    t += "# key = { path = \"signer.pem\" }\n\n";
    t += "[[model]]\n";
    t += &format!("name = \"{name}\"\n");
    t += &format!("path = \"{model_rel}\"\n");
    t += &line("calib", calib.clone(), "calibration dataset (int8-static)")?;
    t += &line(
        "eval",
        eval.clone(),
        "evaluation dataset: top-1 with `labels`, else cosine to fp32",
    )?;
    t += &line(
        "golden",
        beside("sample.npz"),
        "self-test inputs in the artifact (default: synthetic)",
    )?;
    if symbolic {
        let names: Vec<String> = specs
            .iter()
            .map(|s| format!("\"{}=1x...\"", s.name))
            .collect();
        t += &format!(
            "input_shapes = [{}]   # fix the symbolic dims (required)\n",
            names.join(", ")
        );
    } else {
        t += "# input_shapes = [\"input=1x3x224x224\"]   # fix symbolic dims\n";
    }
    t += "\n[model.optimize]\n";
    let quantize = if calib.is_some() {
        "int8-static"
    } else {
        "none"
    };
    t += &format!("quantize = \"{quantize}\"   # none, f16, int8-dynamic, int8-static\n");
    t += "# calibration = \"minmax\"   # minmax, percentile[:P], entropy (int8-static)\n";
    if eval.is_some() && calib.is_some() {
        t += "max_accuracy_drop = 1.0   # points; layers go back to f32 until it holds\n";
    } else {
        t += "# max_accuracy_drop = 1.0   # points (needs eval and quantize)\n";
    }
    t += "# keep_f32 = [\"node_name\"]   # layers to keep in f32\n";
    t += "# int8_everywhere = false   # quantize depthwise convolutions too\n\n";
    t += "# CI budgets for `kiln check` (kiln build writes target/kiln/budgets.toml):\n";
    t += "# kiln check --baseline kiln-baseline.json --budgets target/kiln/budgets.toml\n";
    t += "[check]\n";
    t += "# baseline = \"kiln-baseline.json\"\n";
    t += "noise_sigmas = 3\n";
    t += "[check.budgets]\n";
    t += "size = \"+2%\"\n";
    t += "latency = \"+10%\"\n";
    t += "accuracy = \"-0.5\"\n";
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_as_a_manifest() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("kiln.toml");
        let text = template(&fixtures.join("digits/model.onnx"), &manifest).unwrap();
        assert!(text.contains("quantize = \"int8-static\""), "{text}");
        assert!(
            text.contains("calib = \"") && text.contains("digits/calib.npz"),
            "{text}"
        );
        // With a key path instead of the environment variable, it is a valid manifest.
        std::fs::write(dir.path().join("signer.pem"), b"x").unwrap();
        let text = text.replace(
            "key = { env = \"KILN_SIGNING_KEY\" }",
            "key = { path = \"signer.pem\" }",
        );
        let m = crate::Manifest::parse(&text, &manifest).unwrap();
        assert_eq!(m.models[0].name, "digits");
        assert_eq!(m.models[0].optimize.max_accuracy_drop, Some(1.0));

        let e = template(&fixtures.join("bad/unsupported_op.onnx"), &manifest);
        assert!(e.is_err());
    }
}
