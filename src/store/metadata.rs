//! Generation parameters written into every stored image: an XMP packet (IPTC digital source type
//! `trainedAlgorithmicMedia`, the prompt as `dc:description`, the parameters as `diffusiond:*`
//! properties) in all three formats, plus PNG text chunks (`parameters` in the form most image
//! tools read, and `Software`).
//!
//! - PNG: `iTXt` `XML:com.adobe.xmp` (the XMP packet), `iTXt` `parameters`, `tEXt` `Software`.
//! - JPEG: an APP1 segment `http://ns.adobe.com/xap/1.0/` right after the JFIF header.
//! - WebP: the extended format (`VP8X` with the XMP flag) with an `XMP ` chunk.

/// IPTC NewsCodes digital source type of images made by a trained model.
pub const DIGITAL_SOURCE_TYPE: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";
/// XML namespace of the `diffusiond:` properties.
pub const NAMESPACE: &str = "urn:diffusiond:generation:1.0";
const XMP_APP1_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// How one image was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    pub prompt: String,
    /// Empty when guidance was off.
    pub negative_prompt: String,
    /// The model ID asked for (a catalog ID).
    pub model: String,
    /// The local pipeline that ran it.
    pub pipeline: String,
    pub seed: u64,
    pub steps: u32,
    pub guidance_scale: f32,
    pub width: u32,
    pub height: u32,
    /// `diffusiond <version>`.
    pub software: String,
}

impl Provenance {
    /// The server's `Software` string.
    pub fn software_name() -> String {
        format!("diffusiond {}", env!("CARGO_PKG_VERSION"))
    }

    /// The parameters as one text, in the layout image tools read from PNG `parameters`.
    pub fn parameters_text(&self) -> String {
        let mut out = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&self.negative_prompt);
        }
        out.push_str(&format!(
            "\nSteps: {}, Sampler: Euler (flow matching), CFG scale: {}, Seed: {}, Size: {}x{}, \
             Model: {}, Pipeline: {}, Version: {}",
            self.steps,
            self.guidance_scale,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.pipeline,
            self.software
        ));
        out
    }

    /// The XMP packet.
    pub fn xmp(&self) -> String {
        let e = escape;
        format!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
             <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
             <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
             <rdf:Description rdf:about=\"\"\n \
             xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n \
             xmlns:dc=\"http://purl.org/dc/elements/1.1/\"\n \
             xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\"\n \
             xmlns:diffusiond=\"{NAMESPACE}\"\n \
             Iptc4xmpExt:DigitalSourceType=\"{DIGITAL_SOURCE_TYPE}\"\n \
             xmp:CreatorTool=\"{software}\"\n \
             diffusiond:model=\"{model}\"\n \
             diffusiond:pipeline=\"{pipeline}\"\n \
             diffusiond:seed=\"{seed}\"\n \
             diffusiond:steps=\"{steps}\"\n \
             diffusiond:guidance_scale=\"{guidance}\"\n \
             diffusiond:width=\"{width}\"\n \
             diffusiond:height=\"{height}\"\n \
             diffusiond:negative_prompt=\"{negative}\">\n\
             <dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">{prompt}</rdf:li></rdf:Alt></dc:description>\n\
             </rdf:Description>\n\
             </rdf:RDF>\n\
             </x:xmpmeta>\n\
             <?xpacket end=\"r\"?>",
            software = e(&self.software),
            model = e(&self.model),
            pipeline = e(&self.pipeline),
            seed = self.seed,
            steps = self.steps,
            guidance = self.guidance_scale,
            width = self.width,
            height = self.height,
            negative = e(&self.negative_prompt),
            prompt = e(&self.prompt),
        )
    }
}

/// XML text/attribute escaping; control characters XML cannot hold become spaces.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Insert the XMP packet into an encoded JPEG, after its JFIF APP0 segment (or after SOI).
/// `None` when the bytes are not a JPEG or the packet does not fit one segment.
pub fn jpeg_with_xmp(jpeg: &[u8], xmp: &str) -> Option<Vec<u8>> {
    if jpeg.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut at = 2;
    if jpeg.get(2..4)? == [0xFF, 0xE0] {
        let len = u16::from_be_bytes([*jpeg.get(4)?, *jpeg.get(5)?]) as usize;
        at = 4 + len;
    }
    let seg_len = 2 + XMP_APP1_HEADER.len() + xmp.len();
    let seg_len = u16::try_from(seg_len).ok()?;
    let mut out = Vec::with_capacity(jpeg.len() + seg_len as usize + 2);
    out.extend_from_slice(jpeg.get(..at)?);
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&seg_len.to_be_bytes());
    out.extend_from_slice(XMP_APP1_HEADER);
    out.extend_from_slice(xmp.as_bytes());
    out.extend_from_slice(jpeg.get(at..)?);
    Some(out)
}

#[cfg(test)]
/// The XMP packet of a JPEG, if it has one.
pub fn jpeg_xmp(jpeg: &[u8]) -> Option<String> {
    let mut at = 2;
    while at + 4 <= jpeg.len() && jpeg[at] == 0xFF {
        let marker = jpeg[at + 1];
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
        let body = jpeg.get(at + 4..at + 2 + len)?;
        if marker == 0xE1 {
            if let Some(x) = body.strip_prefix(XMP_APP1_HEADER) {
                return String::from_utf8(x.to_vec()).ok();
            }
        }
        at += 2 + len;
    }
    None
}

/// Turn a simple-format WebP (one `VP8L`/`VP8 ` chunk) into the extended format with an `XMP `
/// chunk. `None` when the bytes are not such a WebP.
pub fn webp_with_xmp(webp: &[u8], width: u32, height: u32, xmp: &str) -> Option<Vec<u8>> {
    if webp.get(..4)? != b"RIFF" || webp.get(8..12)? != b"WEBP" {
        return None;
    }
    let image_chunks = webp.get(12..)?;
    let kind = image_chunks.get(..4)?;
    if kind != b"VP8L" && kind != b"VP8 " {
        return None;
    }
    let mut vp8x = vec![0x04, 0, 0, 0]; // XMP flag
    vp8x.extend_from_slice(&(width.checked_sub(1)?).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(height.checked_sub(1)?).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    push_chunk(&mut body, b"VP8X", &vp8x)?;
    body.extend_from_slice(image_chunks);
    push_chunk(&mut body, b"XMP ", xmp.as_bytes())?;
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&u32::try_from(body.len()).ok()?.to_le_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

fn push_chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], payload: &[u8]) -> Option<()> {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&u32::try_from(payload.len()).ok()?.to_le_bytes());
    out.extend_from_slice(payload);
    if payload.len() % 2 == 1 {
        out.push(0);
    }
    Some(())
}

#[cfg(test)]
/// The XMP packet of a WebP, if it has one.
pub fn webp_xmp(webp: &[u8]) -> Option<String> {
    let mut at = 12;
    while at + 8 <= webp.len() {
        let fourcc = &webp[at..at + 4];
        let len = u32::from_le_bytes(webp[at + 4..at + 8].try_into().ok()?) as usize;
        let payload = webp.get(at + 8..at + 8 + len)?;
        if fourcc == b"XMP " {
            return String::from_utf8(payload.to_vec()).ok();
        }
        at += 8 + len + len % 2;
    }
    None
}

#[cfg(test)]
/// Text chunks of a PNG as (keyword, text), tEXt and iTXt alike.
pub fn png_texts(png_bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().ok()?;
    // Text chunks after the image data are read with the rest of the file.
    let mut buf = vec![0; reader.output_buffer_size()?];
    reader.next_frame(&mut buf).ok()?;
    reader.finish().ok()?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().ok()?));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub fn sample() -> Provenance {
        Provenance {
            prompt: "a \"red\" fox & <snow>\nnaïve 🦊".into(),
            negative_prompt: "blurry".into(),
            model: "flux-2-pro".into(),
            pipeline: "z-image-turbo".into(),
            seed: 18446744073709551615,
            steps: 8,
            guidance_scale: 1.5,
            width: 96,
            height: 64,
            software: Provenance::software_name(),
        }
    }

    #[test]
    fn xmp_escapes_and_names_the_source_type() {
        let x = sample().xmp();
        assert!(x.contains(DIGITAL_SOURCE_TYPE));
        assert!(x.contains("a &quot;red&quot; fox &amp; &lt;snow&gt;&#10;naïve 🦊"));
        assert!(x.contains("diffusiond:seed=\"18446744073709551615\""));
        assert!(!x.contains("<snow>"));
    }

    #[test]
    fn parameters_text_has_every_field() {
        let t = sample().parameters_text();
        for part in [
            "Negative prompt: blurry",
            "Steps: 8",
            "CFG scale: 1.5",
            "Seed: 18446744073709551615",
            "Size: 96x64",
            "Model: flux-2-pro",
            "Pipeline: z-image-turbo",
            "Version: diffusiond ",
        ] {
            assert!(t.contains(part), "{part}: {t}");
        }
    }

    #[test]
    fn non_images_are_left_alone() {
        assert_eq!(jpeg_with_xmp(b"GIF89a", "x"), None);
        assert_eq!(webp_with_xmp(b"RIFF\0\0\0\0WAVEfmt ", 1, 1, "x"), None);
    }
}
