//! `hog`: a hostile guest that allocates and touches memory without bound (tests the
//! memory limit).

fn main() {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let chunk = vec![0xA5u8; 1 << 20];
        chunks.push(std::hint::black_box(chunk));
        println!("holding {} MiB", chunks.len());
    }
}
