//! The test guest's server. It runs as a static binary inside the guest's busybox
//! initramfs and gives the tests (and the lab) connections of every kind to watch
//! across a migration:
//!
//! - [`ECHO_PORT`]: echo, for interactive request/response (TCP), and each datagram back (UDP);
//! - [`STREAM_PORT`]: an endless byte-checked stream; byte `i` is `stream_byte(i)`,
//!   so a client detects any loss, duplication or reordering at any offset;
//! - [`UPLOAD_PORT`]: a byte-checked upload sink; the guest checks every byte against the
//!   stream pattern and acknowledges each chunk with the count checked so far;
//! - [`HTTP_PORT`]: HTTP/1.0 for curl: `/` (a one-line identity), `/id` (the boot id, which
//!   proves the guest answering after a move is the same instance, not a reboot),
//!   `/bytes/<n>` (`n` bytes of the stream pattern, a large file generated on the fly),
//!   `/dirty/<mib>` (starts dirtying `mib` MiB of memory continuously, one byte a page, to
//!   exercise migration of a busy guest), `/churn/<mib>` (the same, but rewriting every
//!   byte, so the dirtying costs CPU time and a vCPU throttle slows it down),
//!   `/disk/write/<offset>/<len>/<seed>` (writes `len` bytes of disk pattern `seed` at
//!   `offset` of the virtio disk and flushes them to it before answering).
//!
//! It is std-only so that it links statically and fast.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use movarto_guest_server::{
    DISK_DEVICE, ECHO_PORT, HTTP_PORT, STREAM_PORT, UPLOAD_BAD, UPLOAD_CHUNK, UPLOAD_PORT,
    fill_disk, fill_stream, stream_byte,
};

fn main() {
    let servers: [(u16, fn(TcpStream)); 4] = [
        (ECHO_PORT, serve_echo),
        (STREAM_PORT, serve_stream),
        (UPLOAD_PORT, serve_upload),
        (HTTP_PORT, serve_http),
    ];
    let mut handles = Vec::new();
    for (port, serve) in servers {
        let listener = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("movarto-guest-server: cannot listen on port {port}: {err}");
                std::process::exit(1);
            }
        };
        handles.push(thread::spawn(move || accept_loop(listener, serve)));
    }
    match UdpSocket::bind(("0.0.0.0", ECHO_PORT)) {
        Ok(socket) => handles.push(thread::spawn(move || serve_udp_echo(socket))),
        Err(err) => {
            eprintln!("movarto-guest-server: cannot listen on UDP port {ECHO_PORT}: {err}");
            std::process::exit(1);
        }
    }
    println!(
        "movarto-guest-server: listening on echo {ECHO_PORT} (TCP and UDP), stream {STREAM_PORT}, upload {UPLOAD_PORT}, http {HTTP_PORT}"
    );
    for handle in handles {
        let _ = handle.join();
    }
}

fn accept_loop(listener: TcpListener, serve: fn(TcpStream)) {
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                thread::spawn(move || serve(conn));
            }
            // Out of resources for a moment; the listener itself stays.
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Each datagram back to its sender, as it came: a client counts what the move lost.
fn serve_udp_echo(socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..len], from);
        }
    }
}

fn serve_echo(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn serve_stream(mut conn: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        fill_stream(&mut buf, offset);
        if conn.write_all(&buf).is_err() {
            return;
        }
        offset += buf.len() as u64;
    }
}

fn serve_upload(mut conn: TcpStream) {
    let mut chunk = vec![0u8; UPLOAD_CHUNK];
    let mut offset = 0u64;
    loop {
        if conn.read_exact(&mut chunk).is_err() {
            return;
        }
        let good = chunk
            .iter()
            .enumerate()
            .all(|(i, b)| *b == stream_byte(offset + i as u64));
        if !good {
            let _ = conn.write_all(&UPLOAD_BAD.to_le_bytes());
            return;
        }
        offset += chunk.len() as u64;
        if conn.write_all(&offset.to_le_bytes()).is_err() {
            return;
        }
    }
}

fn serve_http(conn: TcpStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers; nothing in them matters here.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let mut conn = conn;
    let _ = respond(&mut conn, path);
}

fn respond(conn: &mut TcpStream, path: &str) -> std::io::Result<()> {
    if path == "/" {
        return send_text(conn, "200 OK", "movarto-guest\n");
    }
    if path == "/id" {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_else(|_| "unknown\n".to_owned());
        return send_text(conn, "200 OK", &id);
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(len) = n.parse::<u64>() else {
            return send_text(conn, "400 Bad Request", "length must be a number\n");
        };
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        while offset < len {
            let chunk = (len - offset).min(buf.len() as u64) as usize;
            fill_stream(&mut buf[..chunk], offset);
            conn.write_all(&buf[..chunk])?;
            offset += chunk as u64;
        }
        return Ok(());
    }
    if let Some(mib) = path.strip_prefix("/dirty/") {
        let Ok(mib) = mib.parse::<usize>() else {
            return send_text(conn, "400 Bad Request", "size must be a number of MiB\n");
        };
        thread::spawn(move || dirty_memory(mib));
        return send_text(conn, "200 OK", &format!("dirtying {mib} MiB\n"));
    }
    if let Some(mib) = path.strip_prefix("/churn/") {
        let Ok(mib) = mib.parse::<usize>() else {
            return send_text(conn, "400 Bad Request", "size must be a number of MiB\n");
        };
        thread::spawn(move || churn_memory(mib));
        return send_text(conn, "200 OK", &format!("churning {mib} MiB\n"));
    }
    if let Some(args) = path.strip_prefix("/disk/write/") {
        let numbers: Vec<Option<u64>> = args.split('/').map(|n| n.parse().ok()).collect();
        let [Some(offset), Some(len), Some(seed)] = numbers[..] else {
            return send_text(
                conn,
                "400 Bad Request",
                "use /disk/write/<offset>/<len>/<seed>\n",
            );
        };
        return match write_disk(offset, len, seed) {
            Ok(()) => send_text(
                conn,
                "200 OK",
                &format!("wrote {len} bytes at {offset} with seed {seed}\n"),
            ),
            Err(err) => send_text(
                conn,
                "500 Internal Server Error",
                &format!("writing {DISK_DEVICE}: {err}\n"),
            ),
        };
    }
    send_text(conn, "404 Not Found", "not found\n")
}

/// Writes the pattern and flushes it to the (virtual) disk, so it is on the host's image
/// by the time the client hears back.
fn write_disk(offset: u64, len: u64, seed: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let disk = std::fs::OpenOptions::new().write(true).open(DISK_DEVICE)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(buf.len() as u64) as usize;
        fill_disk(&mut buf[..chunk], seed, offset + done);
        disk.write_all_at(&buf[..chunk], offset + done)?;
        done += chunk as u64;
    }
    disk.sync_all()
}

fn send_text(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Writes every page of a `mib` MiB buffer over and over, so migration always finds
/// them dirty again.
fn dirty_memory(mib: usize) {
    const PAGE: usize = 4096;
    let mut memory = vec![0u8; mib * 1024 * 1024];
    let mut round: u8 = 0;
    loop {
        round = round.wrapping_add(1);
        for page in memory.chunks_mut(PAGE) {
            page[0] = round;
        }
    }
}

/// Rewrites every byte of a `mib` MiB buffer over and over: dirtying that costs CPU time.
fn churn_memory(mib: usize) {
    let mut memory = vec![0u8; mib * 1024 * 1024];
    let mut round: u8 = 0;
    loop {
        round = round.wrapping_add(1);
        memory.fill(round);
        // Keep the writes: the buffer is never read, and the optimiser must not drop them.
        std::hint::black_box(&mut memory);
    }
}
