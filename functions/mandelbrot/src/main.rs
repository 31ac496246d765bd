//! `mandelbrot`: renders the Mandelbrot set on the granted accelerator and answers a
//! PNG. Query: `width`, `height` (pixels, 1-4096; 512), `cx`, `cy` (centre; -0.5, 0),
//! `zoom` (1 shows the whole set), `iterations` (1-100000; 256).

use wafer_guest::accel::{self, Arg};
use wafer_guest::http::{serve, Request, Response};

const KERNEL: &str = r#"
__kernel void mandelbrot(__global uchar4* out, uint width, uint height,
                         float cx, float cy, float scale, uint iterations) {
    uint x = get_global_id(0);
    uint y = get_global_id(1);
    float c_re = cx + ((float)x - width / 2.0f) * scale;
    float c_im = cy + ((float)y - height / 2.0f) * scale;
    float re = 0.0f, im = 0.0f;
    uint i = 0;
    while (i < iterations && re * re + im * im <= 4.0f) {
        float t = re * re - im * im + c_re;
        im = 2.0f * re * im + c_im;
        re = t;
        i++;
    }
    uchar4 colour = (uchar4)(0, 0, 0, 255);
    if (i < iterations) {
        float t = (float)i / (float)iterations;
        colour = (uchar4)((uchar)(9.0f * (1 - t) * t * t * t * 255),
                          (uchar)(15.0f * (1 - t) * (1 - t) * t * t * 255),
                          (uchar)(8.5f * (1 - t) * (1 - t) * (1 - t) * t * 255), 255);
    }
    out[y * width + x] = colour;
}
"#;

fn param<T: std::str::FromStr>(req: &Request, name: &str, default: T) -> Result<T, String> {
    match req.query_param(name) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("query parameter {name}={text:?} is not a number")),
    }
}

fn render(req: &Request) -> Result<Response, String> {
    let width: u32 = param(req, "width", 512)?;
    let height: u32 = param(req, "height", 512)?;
    let cx: f32 = param(req, "cx", -0.5)?;
    let cy: f32 = param(req, "cy", 0.0)?;
    let zoom: f32 = param(req, "zoom", 1.0)?;
    let iterations: u32 = param(req, "iterations", 256)?;
    if !(1..=4096).contains(&width) || !(1..=4096).contains(&height) {
        return Ok(Response::text(400, "width and height are 1 to 4096\n"));
    }
    if !(1..=100_000).contains(&iterations) || !(zoom > 0.0 && zoom.is_finite()) {
        return Ok(Response::text(
            400,
            "iterations are 1 to 100000 and zoom is above 0\n",
        ));
    }
    let scale = 3.0 / (zoom * width.min(height) as f32);
    let program = accel::compile(KERNEL, "-cl-fast-relaxed-math").map_err(|e| e.to_string())?;
    let kernel = program.kernel("mandelbrot").map_err(|e| e.to_string())?;
    let pixels = u64::from(width) * u64::from(height);
    let image = accel::alloc(pixels * 4).map_err(|e| e.to_string())?;
    let info = kernel
        .run(
            &[
                Arg::Buffer(&image),
                Arg::Uint(width),
                Arg::Uint(height),
                Arg::Float(cx),
                Arg::Float(cy),
                Arg::Float(scale),
                Arg::Uint(iterations),
            ],
            &[u64::from(width), u64::from(height)],
            None,
        )
        .map_err(|e| e.to_string())?;
    let mut rgba = vec![0u8; (pixels * 4) as usize];
    image.read(0, &mut rgba).map_err(|e| e.to_string())?;
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&rgba).map_err(|e| e.to_string())?;
    }
    Ok(Response::new(200)
        .header("content-type", "image/png")
        .header("x-device-ns", info.device_ns.to_string())
        .body(png))
}

fn main() {
    serve(|req: Request| render(&req))
}
