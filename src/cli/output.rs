//! Human output: aligned tables for lists, `key: value` for single objects.
//! (`--json` bypasses all of this and prints the daemon's result as is.)

use super::size::format_size;
use serde_json::Value;

/// Left-aligned columns separated by two spaces; no trailing blanks. A row
/// may be shorter than the header: its last cell runs on unaligned (an
/// error in place of the figures) and widens no column.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        // A row's last cell is never padded, so it sets no width.
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < cells.len() {
                line.push_str(&" ".repeat(widths[i] - c.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push(header.to_vec());
    for row in rows {
        push(row.iter().map(|s| s.as_str()).collect());
    }
    out
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{:<w$} {v}\n", format!("{k}:")));
    }
    out
}

pub fn str_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// What a quiesced `snapshot create` did besides the snapshot: the
/// filesystems it froze and what went wrong (one line each; none without
/// a quiesce).
pub fn quiesce_report(r: &Value) -> String {
    let q = &r["quiesce"];
    let mut out = String::new();
    if let Some(frozen) = q["frozen"].as_array() {
        let points: Vec<&str> = frozen.iter().filter_map(Value::as_str).collect();
        out += &match points.len() {
            0 => "no filesystem was mounted on its devices: nothing frozen\n".to_string(),
            _ => format!("froze and thawed {}\n", points.join(", ")),
        };
    }
    for (key, what) in [
        ("error", "not quiesced (crash-consistent)"),
        ("thaw_error", "thaw"),
        ("post_hook_error", "post-hook"),
    ] {
        if let Some(e) = q[key].as_str() {
            out += &format!("warning: {what}: {e}\n");
        }
    }
    out
}

pub fn size_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map(format_size)
        .unwrap_or_else(|| "-".into())
}

pub fn size_with_bytes(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_u64) {
        Some(b) => format!("{} ({b} bytes)", format_size(b)),
        None => "-".into(),
    }
}

/// UNIX milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn volume_list(result: &Value) -> String {
    let vols = result.as_array().cloned().unwrap_or_default();
    if vols.is_empty() {
        return "no volumes; create one with `snapblk volume create NAME --size 10G`\n".into();
    }
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                str_of(v, "name"),
                size_of(v, "capacity"),
                size_of(v, "used_bytes"),
                size_of(v, "chunk_size"),
                str_of(v, "partitions"),
                str_of(v, "snapshots"),
                backend_of(v),
                str_of(v, "owner"),
                str_of(v, "state"),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "SIZE",
            "USED",
            "CHUNK",
            "PARTITIONS",
            "SNAPSHOTS",
            "BACKEND",
            "OWNER",
            "STATE",
        ],
        &rows,
    )
}

/// The cache mode, and for O_DIRECT how many requests it could not take
/// as they were.
fn cache_of(v: &Value) -> String {
    let mode = str_of(v, "cache");
    match v.get("bounced_ios").and_then(Value::as_u64) {
        Some(n) if mode == "none" => {
            format!("none (O_DIRECT; {n} unaligned requests bounced)")
        }
        Some(n) if mode == "writearound" => {
            format!("writearound (O_DIRECT writes, cached reads; {n} unaligned requests bounced)")
        }
        _ => mode,
    }
}

/// `local`, or `ceph POOL/IMAGE` for a volume in a Ceph pool; `-` for one
/// that could not be opened (its state says why).
fn backend_of(v: &Value) -> String {
    match (v.get("ceph"), v.get("backend")) {
        (Some(c), _) => format!("ceph {}/{}", str_of(c, "pool"), str_of(c, "image")),
        (None, Some(_)) => "local".into(),
        (None, None) => "-".into(),
    }
}

pub fn volume_info(v: &Value) -> String {
    let state = str_of(v, "state");
    if state != "ok" {
        return key_values(&[("name", str_of(v, "name")), ("state", state)]);
    }
    let mut pairs = vec![
        ("name", str_of(v, "name")),
        ("state", state),
        ("capacity", size_with_bytes(v, "capacity")),
        ("used", size_with_bytes(v, "used_bytes")),
        ("free", size_with_bytes(v, "free_bytes")),
        ("chunk size", size_with_bytes(v, "chunk_size")),
        ("partitions", str_of(v, "partitions")),
        ("generation", str_of(v, "generation")),
        ("snapshots", str_of(v, "snapshots")),
        ("origin", str_of(v, "origin")),
        ("cache", cache_of(v)),
        ("backend", backend_of(v)),
    ];
    if v.get("parent").is_some() {
        pairs.push(("parent", str_of(v, "parent")));
        pairs.push(("own data", size_with_bytes(v, "owned_bytes")));
    }
    if let Some(flatten) = v.get("flatten") {
        pairs.push(("flatten", flatten_of(flatten)));
    }
    if let Some(clones) = v.get("clones").and_then(Value::as_array) {
        let names: Vec<String> = clones
            .iter()
            .filter_map(|c| c.as_str())
            .map(String::from)
            .collect();
        pairs.push(("clones", names.join(", ")));
    }
    if let Some(ceph) = v.get("ceph") {
        pairs.push(("lock holder", str_of(ceph, "lock_holder")));
    }
    if let Some(guard) = v.get("space_guard") {
        pairs.push(("space guard", space_guard_of(guard)));
    }
    pairs.push(("held by snapshots", size_with_bytes(v, "snapshot_bytes")));
    if let Some(access) = v.get("access") {
        pairs.push(("owner", str_of(access, "owner")));
        pairs.push(("access", acl_of(access)));
    }
    if let Some(q) = v.get("quota") {
        pairs.push(("owner's quota", quota_of(q)));
    }
    if let Some(list) = v.get("snapshot_list").and_then(Value::as_array) {
        if !list.is_empty() {
            let names: Vec<String> = list.iter().map(|s| str_of(s, "name")).collect();
            pairs.push(("snapshot names", names.join(", ")));
        }
    }
    key_values(&pairs)
}

/// An access list on one line: `user:bob=read, group:staff=write`.
fn acl_of(access: &Value) -> String {
    let entries: Vec<String> = access["acl"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| format!("{}={}", str_of(e, "principal"), str_of(e, "level")))
                .collect()
        })
        .unwrap_or_default();
    if entries.is_empty() {
        "owner only".into()
    } else {
        entries.join(", ")
    }
}

/// `8.0 MiB used of 16.0 MiB`, or `8.0 MiB used, no limit`.
fn quota_of(q: &Value) -> String {
    match q.get("limit").and_then(Value::as_u64) {
        Some(_) => format!("{} used of {}", size_of(q, "used"), size_of(q, "limit")),
        None => format!("{} used, no limit", size_of(q, "used")),
    }
}

/// `volume access` / `volume chown`: owner, then one line per entry.
pub fn access(v: &Value) -> String {
    let mut out = format!(
        "volume {} is owned by {}\n",
        str_of(v, "volume"),
        str_of(v, "owner")
    );
    match v["acl"].as_array() {
        Some(a) if !a.is_empty() => {
            for e in a {
                out += &format!("  {} {}\n", str_of(e, "principal"), str_of(e, "level"));
            }
        }
        _ => out += "  no other user or group has access (root always has)\n",
    }
    out
}

/// `snapblk quota`: a row per user.
pub fn quotas(result: &Value) -> String {
    let users = result.as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            let names: Vec<String> = u["volumes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            vec![
                str_of(u, "user"),
                if u["limit"].is_null() {
                    "none".into()
                } else {
                    size_of(u, "limit")
                },
                size_of(u, "used"),
                if names.is_empty() {
                    "-".into()
                } else {
                    names.join(",")
                },
            ]
        })
        .collect();
    table(&["USER", "LIMIT", "USED", "VOLUMES"], &rows)
}

/// The space guard's threshold and last prune, e.g. `at 90% used (filesystem
/// 42.5% used); last prune: auto1-000003 of db, 8.0 MiB freed, 91.2% -> 83.0%`.
pub fn space_guard_of(g: &Value) -> String {
    if g["enabled"] != Value::Bool(true) {
        return if g["threshold_percent"].is_null() {
            "off".into()
        } else {
            "not for this volume (its space is not on a local filesystem)".into()
        };
    }
    let mut out = format!("at {}% used", str_of(g, "threshold_percent"));
    if let Some(used) = g["filesystem_used_percent"].as_f64() {
        out += &format!(" (filesystem {used}% used)");
    }
    match g["last_prune"].as_object() {
        None => out += "; nothing pruned",
        Some(_) => {
            let p = &g["last_prune"];
            out += &format!(
                "; last prune: {} of {}, {} freed, {}% -> {}%",
                str_of(p, "snapshot"),
                str_of(p, "volume"),
                size_of(p, "bytes_freed"),
                str_of(p, "used_percent_before"),
                str_of(p, "used_percent_after"),
            );
        }
    }
    out
}

/// A flatten's state and progress, e.g. `running, 1200 of 16384 chunks copied`.
pub fn flatten_of(f: &Value) -> String {
    format!(
        "{}, {} of {} chunks copied",
        str_of(f, "state"),
        str_of(f, "copied_chunks"),
        str_of(f, "total_chunks")
    )
}

pub fn snapshot_list(volume: &str, result: &Value) -> String {
    let snaps = result.as_array().cloned().unwrap_or_default();
    if snaps.is_empty() {
        return format!(
            "volume {volume} has no snapshots; take one with `snapblk snapshot create {volume} NAME`\n"
        );
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                str_of(s, "name"),
                str_of(s, "generation"),
                s.get("created_unix_ms")
                    .and_then(Value::as_u64)
                    .map(format_unix_ms)
                    .unwrap_or_else(|| "-".into()),
                size_of(s, "exclusive_bytes"),
            ]
        })
        .collect();
    table(&["NAME", "GENERATION", "CREATED", "EXCLUSIVE"], &rows)
}

/// `snapshot diff`: one row per changed extent, then the total.
pub fn snapshot_diff(result: &Value) -> String {
    let extents = result["extents"].as_array().cloned().unwrap_or_default();
    let to = match result["to"].as_str() {
        Some(s) => s.to_string(),
        None => "the live volume".to_string(),
    };
    let rows: Vec<Vec<String>> = extents
        .iter()
        .map(|e| vec![str_of(e, "offset"), str_of(e, "length")])
        .collect();
    let changed = result["changed_bytes"].as_u64().unwrap_or(0);
    let size = result["size"].as_u64().unwrap_or(0).max(1);
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        table(&["OFFSET", "LENGTH"], &rows)
    };
    out.push_str(&format!(
        "{} changed between {} and {to} ({:.1}% of {}) in {} extents\n",
        format_size(changed),
        str_of(result, "from"),
        changed as f64 * 100.0 / size as f64,
        size_of(result, "size"),
        extents.len()
    ));
    out
}

/// `device list`: one row per device; devices that failed to start are
/// listed with their error below the table.
pub fn device_list(result: &Value) -> String {
    let devs = result.as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = devs
        .iter()
        .map(|d| {
            let device = match d.get("path").and_then(Value::as_str) {
                Some(p) => p.to_string(),
                None if str_of(d, "state").starts_with("error") => "(failed)".to_string(),
                None => "-".to_string(),
            };
            let mode = match d.get("read_only").and_then(Value::as_bool) {
                Some(true) => "ro",
                Some(false) => "rw",
                None => "-",
            };
            let recovery = match d.get("recovery").and_then(Value::as_bool) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            vec![
                device,
                str_of(d, "volume"),
                str_of(d, "snapshot"),
                mode.to_string(),
                str_of(d, "queues"),
                str_of(d, "depth"),
                recovery.to_string(),
                str_of(d, "buffers"),
                // The reason of an error follows the table.
                match str_of(d, "state") {
                    s if s.starts_with("error") => "error".to_string(),
                    s => s,
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "DEVICE", "VOLUME", "SNAPSHOT", "MODE", "QUEUES", "DEPTH", "RECOVERY", "BUFFERS",
            "STATE",
        ],
        &rows,
    );
    for d in &devs {
        let state = str_of(d, "state");
        if let Some(err) = state.strip_prefix("error: ") {
            let key = match d.get("snapshot").and_then(Value::as_str) {
                Some(s) => format!("{}@{s}", str_of(d, "volume")),
                None => str_of(d, "volume"),
            };
            match err.strip_prefix("stop failed: ") {
                Some(why) => out.push_str(&format!("{key}: stop failed: {why}\n")),
                None => out.push_str(&format!("{key}: not running: {err}\n")),
            }
        }
    }
    out
}

/// `features`: the driver's feature bits, then one supported feature a line.
pub fn features(result: &Value) -> String {
    let mut out = match result.get("driver_features").and_then(Value::as_u64) {
        Some(bits) => format!("ublk driver features: {bits:#018x}\n"),
        None => "ublk driver features: -\n".to_string(),
    };
    for name in result
        .get("names")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        out.push_str(name.as_str().unwrap_or("?"));
        out.push('\n');
    }
    for note in result
        .get("notes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        out.push_str(note.as_str().unwrap_or("?"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_table() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a".into(), "1 GiB".into()],
                vec!["longer".into(), "2 B".into()],
            ],
        );
        assert_eq!(t, "NAME    SIZE\na       1 GiB\nlonger  2 B\n");
    }

    #[test]
    fn devices_and_features() {
        use serde_json::json;
        assert_eq!(
            device_list(&json!([])),
            "DEVICE  VOLUME  SNAPSHOT  MODE  QUEUES  DEPTH  RECOVERY  BUFFERS  STATE\n"
        );
        let t = device_list(&json!([
            {"id":0,"path":"/dev/ublkb0","volume":"v","snapshot":null,"read_only":false,
             "queues":1,"depth":64,"recovery":true,"buffers":"copy","state":"running"},
            {"id":null,"path":null,"volume":"v","snapshot":"s","read_only":true,
             "queues":2,"depth":128,"recovery":false,"buffers":null,"state":"error: no ublk"}
        ]));
        assert_eq!(
            t,
            "DEVICE       VOLUME  SNAPSHOT  MODE  QUEUES  DEPTH  RECOVERY  BUFFERS  STATE\n\
             /dev/ublkb0  v       -         rw    1       64     yes       copy     running\n\
             (failed)     v       s         ro    2       128    no        -        error\n\
             v@s: not running: no ublk\n"
        );
        assert_eq!(
            features(
                &json!({"driver_features": 0x42, "names": ["USER_RECOVERY", "USER_COPY"],
                "notes": ["zero copy: not available"]})
            ),
            "ublk driver features: 0x0000000000000042\nUSER_RECOVERY\nUSER_COPY\n\
             zero copy: not available\n"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_ms(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
