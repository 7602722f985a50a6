//! `ia2run --map`: a picture of dav1d's compartments, rendered by
//! rsvg-convert (librsvg2-bin, installed by scripts/setup.sh). Natively with
//! IA2_PKU=sim: the plan and the gate counts are the same as with keys, and
//! no VM boots.

mod support;
use std::path::Path;
use std::process::Command;
use support::*;

/// Renders `svg` to PNG; the PNG's width and height, or the renderer's error.
fn render(svg: &Path) -> Result<(u32, u32, u64), String> {
    let png = svg.with_extension("png");
    let o = Command::new("rsvg-convert")
        .arg(svg)
        .arg("-o")
        .arg(&png)
        .output()
        .map_err(|e| {
            format!("rsvg-convert (apt-get install librsvg2-bin, or run scripts/setup.sh): {e}")
        })?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let b = std::fs::read(&png).unwrap();
    assert_eq!(&b[1..4], b"PNG");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    Ok((be(16), be(20), b.len() as u64))
}

#[test]
fn dav1d_map_renders() {
    let dir = work_dir("map");
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/clips/clip64.ivf");
    let shim = ia2run::find_shim(None).expect("build the shim: cargo build --release --workspace");
    let run = |out: &str| {
        ia2run()
            .current_dir(&dir)
            .args(["--native", "--shim"])
            .arg(&shim)
            .args([
                "--env",
                "IA2_PKU=sim",
                "--map",
                out,
                "--",
                "dav1d",
                "-q",
                "-i",
            ])
            .arg(&clip)
            .args(["-o", "/dev/null", "--muxer", "null", "--threads", "1"])
            .output()
            .unwrap()
    };
    let o = run("dav1d.svg");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let svg = std::fs::read_to_string(dir.join("dav1d.svg")).unwrap();
    for want in [
        ">dav1d<",
        ">libdav1d.so.6<",
        "compartment 2",
        "copy_relocs +0x",
        "(IA2_SHARE_COPY_RELOCS=1)",
        "dav1d_get_picture ×",
        "C1 → C2: ",
    ] {
        assert!(svg.contains(want), "the picture lacks {want:?}");
    }
    // No report files left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let (w, h, size) = render(&dir.join("dav1d.svg")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        w >= 1000 && h >= 300 && size > 20_000,
        "{w}x{h}, {size} bytes"
    );

    // The check can fail: a truncated picture does not render.
    let cut = dir.join("cut.svg");
    std::fs::write(&cut, &svg[..svg.len() / 2]).unwrap();
    assert!(render(&cut).is_err(), "a truncated SVG rendered");

    // The HTML page holds the same picture and the tables.
    let o = run("dav1d.html");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let html = std::fs::read_to_string(dir.join("dav1d.html")).unwrap();
    assert!(html.ends_with("</html>\n") && html.contains("<summary>Carveouts"));
    let start = html.find("<svg").unwrap();
    let end = html.find("</svg>").unwrap() + "</svg>".len();
    let inner = dir.join("from-html.svg");
    std::fs::write(&inner, &html[start..end]).unwrap();
    render(&inner).unwrap_or_else(|e| panic!("{e}"));

    let o = run("dav1d.png");
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
}
