//! Fixed newstyle negotiation: the greeting and the option haggling phase.
//!
//! Runs with blocking I/O on the connection's socket, before the connection
//! enters its io_uring executor: options are few and small, and reading
//! exactly what each option holds (no read-ahead) means that nothing a client
//! sends right after NBD_OPT_GO is lost when the transmission phase takes
//! over the socket.
//!
//! The phase is generic over [`Catalog`] so that its byte-level behaviour is
//! unit tested without an engine.
//!
//! [`Policy`] says what a connection may do before it names an export: a
//! peer the server refuses gets `NBD_REP_ERR_POLICY` with the reason for
//! every option (and nothing else); with TLS required, every option but
//! STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` until TLS is up. After
//! STARTTLS the caller runs the TLS handshake and resumes with
//! [`resume_over_tls`]; nothing negotiated in plain text carries over
//! (as nbdkit does), so a man in the middle cannot have chosen anything.

use super::proto::*;
use super::tls::TlsMode;
use super::ExportResolver;
use crate::engine::{EngineError, View};
use crate::security::Caller;
use std::io::{self, Read, Write};

/// What the handshake needs to know about an export.
pub(crate) trait Export {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn preferred_block_size(&self) -> u32;
    fn description(&self) -> String;
    /// Snapshots a `qemu:dirty-bitmap:NAME` context may count changes from.
    fn dirty_bitmaps(&self) -> Vec<String>;
}

impl Export for View {
    fn size(&self) -> u64 {
        View::size(self)
    }
    fn read_only(&self) -> bool {
        View::read_only(self)
    }
    fn preferred_block_size(&self) -> u32 {
        preferred_block_size(self.volume().chunk_size())
    }
    fn description(&self) -> String {
        match self.snapshot_name() {
            Some(s) => format!(
                "snapshot {s} of volume {} (read-only)",
                self.volume().name()
            ),
            None => format!("volume {}", self.volume().name()),
        }
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        // Names starting with '.' are the daemon's own (a copy job's
        // point-in-time image), never exported.
        let mut names = self.older_snapshots();
        names.retain(|n| !n.starts_with('.'));
        names
    }
}

/// The preferred block size advertised for a volume with this chunk size.
pub(crate) fn preferred_block_size(chunk_size: u32) -> u32 {
    if chunk_size.is_power_of_two()
        && (DEFAULT_PREFERRED_BLOCK_SIZE..=MAX_PAYLOAD).contains(&chunk_size)
    {
        chunk_size
    } else {
        DEFAULT_PREFERRED_BLOCK_SIZE
    }
}

/// Where exports come from.
pub(crate) trait Catalog {
    type Export: Export;
    fn resolve(&self, name: &str) -> Result<Self::Export, EngineError>;
    fn list(&self) -> Vec<String>;
    fn default_export(&self) -> Option<String>;
    /// Whether `caller` may write export `name` (`Ok(false)`: read it
    /// only); `Err` says why it may not use it at all.
    fn permits(&self, _name: &str, _caller: &Caller) -> Result<bool, String> {
        Ok(true)
    }
}

impl Catalog for dyn ExportResolver {
    type Export = View;
    fn resolve(&self, name: &str) -> Result<View, EngineError> {
        ExportResolver::resolve(self, name)
    }
    fn list(&self) -> Vec<String> {
        ExportResolver::list(self)
    }
    fn default_export(&self) -> Option<String> {
        ExportResolver::default_export(self)
    }
    fn permits(&self, name: &str, caller: &Caller) -> Result<bool, String> {
        ExportResolver::permits(self, name, caller)
    }
}

/// The result of a successful negotiation.
pub(crate) struct Negotiated<E> {
    pub export: E,
    pub name: String,
    pub structured: bool,
    /// The metadata contexts selected for this export; each one's id is
    /// its index + 1.
    pub contexts: Vec<MetaContext>,
    pub flags: u16,
}

/// A metadata context a client can select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetaContext {
    /// `base:allocation`: holes and zeros.
    BaseAllocation,
    /// `qemu:dirty-bitmap:SNAP`: what changed since snapshot SNAP, as QEMU
    /// reports a dirty bitmap (flag 1: dirty), so incremental-backup
    /// tools read it unchanged.
    DirtyBitmap(String),
}

impl MetaContext {
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => META_BASE_ALLOCATION.to_owned(),
            MetaContext::DirtyBitmap(s) => format!("{META_DIRTY_BITMAP_PREFIX}{s}"),
        }
    }
}

pub(crate) enum Outcome<E> {
    Transmission(Negotiated<E>),
    /// The client aborted or left; nothing more to do.
    Closed,
    /// STARTTLS was acknowledged: run the TLS handshake on the socket, then
    /// [`resume_over_tls`].
    StartTls(Resume),
}

/// What survives STARTTLS: the client's flags and its option budget.
pub(crate) struct Resume {
    no_zeroes: bool,
    options_left: usize,
}

/// What a connection may do before it names an export.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub tls: TlsMode,
    /// This peer may not use the server: every option is refused with this
    /// reason.
    pub refused: Option<String>,
    /// The UNIX-socket peer whose access each export is checked against
    /// (`None`: a TCP peer, trusted through TLS, or a test).
    pub caller: Option<Caller>,
}

impl Policy {
    #[cfg(test)]
    fn open() -> Policy {
        Policy {
            tls: TlsMode::Off,
            refused: None,
            caller: None,
        }
    }
}

/// Options a single connection may send before we give up on it.
const MAX_OPTIONS: usize = 4096;

/// Transmission flags for an export.
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        // Reads are always answered with one chunk, so "don't fragment" is
        // honoured for free.
        flags |= TFLAG_SEND_DF;
    }
    flags
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A cursor over an option's payload; every read checks the length.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(*head))
    }
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    /// A u32-length-prefixed UTF-8 string of at most MAX_STRING_LEN bytes.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return None;
        }
        let bytes = self.bytes(len)?;
        let s = std::str::from_utf8(bytes).ok()?;
        (!s.contains('\0')).then_some(s)
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest<'a> {
    pub name: &'a str,
    pub requests: Vec<u16>,
}

pub(crate) fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut p = Payload(data);
    let name = p.string()?;
    let n = p.u16()? as usize;
    let mut requests = Vec::with_capacity(n);
    for _ in 0..n {
        requests.push(p.u16()?);
    }
    p.0.is_empty().then_some(InfoRequest { name, requests })
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MetaRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

pub(crate) fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut p = Payload(data);
    let name = p.string()?;
    let n = p.u32()? as usize;
    // Each query takes at least 4 bytes: refuse absurd counts before allocating.
    if n > p.0.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(p.string()?);
    }
    p.0.is_empty().then_some(MetaRequest { name, queries })
}

/// The contexts `queries` select, base:allocation first, then bitmaps in
/// the order asked, each once. Exact names select in LIST and SET; LIST
/// also takes an empty query list (everything) and, as QEMU does, the
/// namespace queries "base:", "qemu:" and "qemu:dirty-bitmap:".
fn select_contexts(queries: &[&str], list: bool, bitmaps: &[String]) -> Vec<MetaContext> {
    let all = list && queries.is_empty();
    let mut out = Vec::new();
    if all
        || queries
            .iter()
            .any(|q| *q == META_BASE_ALLOCATION || (list && *q == "base:"))
    {
        out.push(MetaContext::BaseAllocation);
    }
    for q in queries.iter().copied().chain(all.then_some("qemu:")) {
        let names: Vec<&String> = match q.strip_prefix(META_DIRTY_BITMAP_PREFIX) {
            Some("") if list => bitmaps.iter().collect(),
            Some(name) => bitmaps.iter().filter(|b| *b == name).collect(),
            None if list && q == "qemu:" => bitmaps.iter().collect(),
            None => Vec::new(),
        };
        for n in names {
            let c = MetaContext::DirtyBitmap(n.clone());
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

struct Session<'c, S, C: ?Sized> {
    stream: &'c mut S,
    catalog: &'c C,
    caller: Option<&'c Caller>,
    out: Vec<u8>,
    structured: bool,
    /// The export name contexts were selected for, and those contexts.
    meta_for: Option<(String, Vec<MetaContext>)>,
}

impl<'c, S: Read + Write, C: Catalog + ?Sized> Session<'c, S, C> {
    fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) {
        put_option_reply(&mut self.out, option, kind, payload);
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) {
        let msg = truncate_utf8(message, MAX_STRING_LEN).to_owned();
        self.reply(option, kind, msg.as_bytes());
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.stream.flush()?;
            self.out.clear();
        }
        Ok(())
    }

    /// Whether the caller may open export `name` at all (read or write).
    fn may_open(&self, name: &str) -> bool {
        match self.caller {
            Some(caller) if !caller.superuser => self.catalog.permits(name, caller).is_ok(),
            _ => true,
        }
    }

    /// The export `name` names, and whether the caller may write it; `Err`
    /// is the option's error reply (unknown, or the caller may not use it).
    fn resolve(&self, name: &str) -> Result<(String, C::Export, bool), (u32, String)> {
        let canonical = if name.is_empty() {
            match self.catalog.default_export() {
                Some(d) => d,
                None => return Err((REP_ERR_UNKNOWN, "no default export: name one".to_owned())),
            }
        } else {
            name.to_owned()
        };
        let writable = match self.caller {
            Some(caller) if !caller.superuser => {
                self.catalog.permits(&canonical, caller).map_err(|why| {
                    log::warn!(
                        "nbd: refused export '{canonical}' to {}: {why}",
                        caller.describe()
                    );
                    (REP_ERR_POLICY, why)
                })?
            }
            _ => true,
        };
        match self.catalog.resolve(&canonical) {
            Ok(e) => Ok((canonical, e, writable)),
            Err(e) => Err((REP_ERR_UNKNOWN, format!("export '{canonical}': {e}"))),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Option<Negotiated<C::Export>> {
        let Some(req) = parse_info_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO payload");
            return None;
        };
        let (canonical, export, writable) = match self.resolve(req.name) {
            Ok(v) => v,
            Err((kind, msg)) => {
                self.error(option, kind, &msg);
                return None;
            }
        };
        let flags = transmission_flags(export.read_only() || !writable, self.structured);

        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&export.size().to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &p);

        if req.requests.contains(&INFO_NAME) {
            let mut p = INFO_NAME.to_be_bytes().to_vec();
            p.extend_from_slice(canonical.as_bytes());
            self.reply(option, REP_INFO, &p);
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
            p.extend_from_slice(truncate_utf8(&export.description(), MAX_STRING_LEN).as_bytes());
            self.reply(option, REP_INFO, &p);
        }
        // Always sent: the engine refuses I/O that is not sector aligned.
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        p.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&export.preferred_block_size().to_be_bytes());
        p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(option, REP_INFO, &p);
        self.reply(option, REP_ACK, &[]);

        if option != OPT_GO {
            return None;
        }
        Some(Negotiated {
            export,
            name: canonical,
            structured: self.structured,
            contexts: self.contexts_for(req.name),
            flags,
        })
    }

    /// Contexts selected for export `name` (one selected for another
    /// export name does not carry over).
    fn contexts_for(&self, name: &str) -> Vec<MetaContext> {
        match &self.meta_for {
            Some((n, contexts)) if self.structured && n == name => contexts.clone(),
            _ => Vec::new(),
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies first",
            );
            return;
        }
        let Some(req) = parse_meta_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed meta context payload");
            return;
        };
        let export = match self.resolve(req.name) {
            Ok((_, export, _)) => export,
            Err((kind, msg)) => {
                self.error(option, kind, &msg);
                return;
            }
        };
        let selected = select_contexts(&req.queries, !set, &export.dirty_bitmaps());
        for (id, context) in (META_BASE_ALLOCATION_ID..).zip(&selected) {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(context.name().as_bytes());
            self.reply(option, REP_META_CONTEXT, &p);
        }
        if set {
            self.meta_for = Some((req.name.to_owned(), selected));
        }
        self.reply(option, REP_ACK, &[]);
    }
}

/// Runs the whole negotiation on `stream`. An `Err` means the connection must
/// be closed (I/O failure or a client that broke the protocol).
pub(crate) fn negotiate<S: Read + Write, C: Catalog + ?Sized>(
    stream: &mut S,
    catalog: &C,
    policy: &Policy,
) -> io::Result<Outcome<C::Export>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    stream.flush()?;

    let client_flags = read_u32(stream)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let resume = Resume {
        no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
        options_left: MAX_OPTIONS,
    };
    options(stream, catalog, policy, resume, false)
}

/// Goes on with option haggling over `stream`, now TLS, after
/// [`Outcome::StartTls`] and a successful TLS handshake.
pub(crate) fn resume_over_tls<S: Read + Write, C: Catalog + ?Sized>(
    stream: &mut S,
    catalog: &C,
    policy: &Policy,
    resume: Resume,
) -> io::Result<Outcome<C::Export>> {
    options(stream, catalog, policy, resume, true)
}

/// The message of NBD_REP_ERR_TLS_REQD.
const TLS_REQUIRED: &str = "TLS is required by this server: start TLS first \
     (qemu: a tls-creds-x509 object; libnbd: an nbds:// URI)";

fn options<S: Read + Write, C: Catalog + ?Sized>(
    stream: &mut S,
    catalog: &C,
    policy: &Policy,
    resume: Resume,
    tls_active: bool,
) -> io::Result<Outcome<C::Export>> {
    let no_zeroes = resume.no_zeroes;
    let mut s = Session {
        stream,
        catalog,
        caller: policy.caller.as_ref(),
        out: Vec::new(),
        structured: false,
        meta_for: None,
    };
    for left in (0..resume.options_left).rev() {
        let mut head = [0u8; 16];
        match s.stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e),
        }
        let magic = u64::from_be_bytes(head[0..8].try_into().unwrap());
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let length = u32::from_be_bytes(head[12..16].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        if length > MAX_OPTION_LEN {
            return Err(protocol_error(format!(
                "option {option} of {length} bytes is too long"
            )));
        }
        let mut data = vec![0u8; length as usize];
        s.stream.read_exact(&mut data)?;

        let refusal = match &policy.refused {
            Some(why) => Some((REP_ERR_POLICY, why.as_str())),
            None if policy.tls == TlsMode::Require && !tls_active => {
                Some((REP_ERR_TLS_REQD, TLS_REQUIRED))
            }
            None => None,
        };
        if let Some((kind, why)) = refusal {
            match option {
                OPT_ABORT => {}
                OPT_STARTTLS if kind == REP_ERR_TLS_REQD => {}
                // EXPORT_NAME has no error reply: closing is all we can do.
                OPT_EXPORT_NAME => return Err(protocol_error(why)),
                _ => {
                    s.error(option, kind, why);
                    s.flush()?;
                    continue;
                }
            }
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| protocol_error("export name is not UTF-8"))?;
                let (canonical, export, writable) =
                    s.resolve(name).map_err(|(_, why)| protocol_error(why))?;
                let flags = transmission_flags(export.read_only() || !writable, s.structured);
                s.out.extend_from_slice(&export.size().to_be_bytes());
                s.out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    s.out.extend_from_slice(&[0u8; 124]);
                }
                s.flush()?;
                return Ok(Outcome::Transmission(Negotiated {
                    export,
                    name: canonical,
                    structured: s.structured,
                    contexts: s.contexts_for(name),
                    flags,
                }));
            }
            OPT_ABORT => {
                s.reply(option, REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = s.flush();
                return Ok(Outcome::Closed);
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    s.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no payload");
                } else if tls_active {
                    s.error(option, REP_ERR_INVALID, "TLS is already active");
                } else if policy.tls == TlsMode::Off {
                    s.error(
                        option,
                        REP_ERR_POLICY,
                        "TLS is not enabled on this server (snapblk daemon --tls-cert/--tls-key)",
                    );
                } else {
                    s.reply(option, REP_ACK, &[]);
                    s.flush()?;
                    return Ok(Outcome::StartTls(Resume {
                        no_zeroes,
                        options_left: left,
                    }));
                }
            }
            OPT_LIST => {
                if !data.is_empty() {
                    s.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no payload");
                } else {
                    // Only what the caller may open: the names of other
                    // users' volumes are theirs to know.
                    for name in s.catalog.list() {
                        if !s.may_open(&name) {
                            continue;
                        }
                        let mut p = (name.len() as u32).to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        s.reply(option, REP_SERVER, &p);
                    }
                    s.reply(option, REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => {
                if let Some(n) = s.info_or_go(option, &data) {
                    s.flush()?;
                    return Ok(Outcome::Transmission(n));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    s.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no payload",
                    );
                } else {
                    s.structured = true;
                    s.reply(option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => s.meta_context(option, &data),
            _ => s.error(
                option,
                REP_ERR_UNSUP,
                &format!("option {option} is not supported"),
            ),
        }
        s.flush()?;
    }
    Err(protocol_error("too many options"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    struct FakeExport {
        size: u64,
        ro: bool,
    }
    impl Export for FakeExport {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn preferred_block_size(&self) -> u32 {
            65536
        }
        fn description(&self) -> String {
            "fake".into()
        }
        fn dirty_bitmaps(&self) -> Vec<String> {
            // The live volume is newer than its snapshot; the snapshot has none older.
            match self.ro {
                true => vec![],
                false => vec!["snap".into()],
            }
        }
    }
    struct FakeCatalog;
    impl Catalog for FakeCatalog {
        type Export = FakeExport;
        fn resolve(&self, name: &str) -> Result<FakeExport, EngineError> {
            match name {
                "vol" => Ok(FakeExport {
                    size: 1 << 20,
                    ro: false,
                }),
                "vol@snap" => Ok(FakeExport {
                    size: 1 << 20,
                    ro: true,
                }),
                _ => Err(EngineError::NotFound(format!("volume {name}"))),
            }
        }
        fn list(&self) -> Vec<String> {
            vec!["vol".into(), "vol@snap".into()]
        }
        fn default_export(&self) -> Option<String> {
            Some("vol".into())
        }
    }

    /// A stream that reads scripted client bytes and records server bytes.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn opt(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(b"IHAVEOPT");
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// A client's side of a handshake: fixed newstyle + no zeroes, then
    /// `options` (option, data).
    fn client(options: &[(u32, &[u8])]) -> Vec<u8> {
        let mut c = 3u32.to_be_bytes().to_vec();
        for (option, data) in options {
            opt(&mut c, *option, data);
        }
        c
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    fn run(client: Vec<u8>) -> (io::Result<Outcome<FakeExport>>, Vec<u8>) {
        run_with(&Policy::open(), client)
    }

    fn run_with(policy: &Policy, client: Vec<u8>) -> (io::Result<Outcome<FakeExport>>, Vec<u8>) {
        let mut s = Script {
            input: Cursor::new(client),
            output: Vec::new(),
        };
        let r = negotiate(&mut s, &FakeCatalog, policy);
        (r, s.output)
    }

    fn tls(mode: TlsMode) -> Policy {
        Policy {
            tls: mode,
            refused: None,
            caller: None,
        }
    }

    /// The options after STARTTLS, as if the TLS handshake had happened.
    fn after_tls(
        policy: &Policy,
        resume: Resume,
        options: &[(u32, &[u8])],
    ) -> (io::Result<Outcome<FakeExport>>, Vec<u8>) {
        let mut input = Vec::new();
        for (option, data) in options {
            opt(&mut input, *option, data);
        }
        let mut s = Script {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = resume_over_tls(&mut s, &FakeCatalog, policy, resume);
        (r, s.output)
    }

    /// Splits option replies: (option, type, payload).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        v
    }

    const GREETING: [u8; 18] = [
        b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O', b'P',
        b'T', 0, 3,
    ];

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let c = client(&[
            (OPT_STRUCTURED_REPLY, &[]),
            (
                OPT_SET_META_CONTEXT,
                &meta_payload("vol", &["base:allocation", "qemu:dirty"]),
            ),
            (OPT_GO, &go_payload("vol", &[INFO_NAME, INFO_BLOCK_SIZE])),
        ]);
        let (r, out) = run(c);
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("closed")
        };
        assert!(n.structured && n.contexts == [MetaContext::BaseAllocation]);
        assert_eq!(n.name, "vol");
        assert_eq!(&out[..18], &GREETING);
        let reps = replies(&out[18..]);
        assert_eq!(reps[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        let mut ctx = vec![0, 0, 0, 1];
        ctx.extend_from_slice(b"base:allocation");
        assert_eq!(reps[1], (OPT_SET_META_CONTEXT, REP_META_CONTEXT, ctx));
        assert_eq!(reps[2], (OPT_SET_META_CONTEXT, REP_ACK, vec![]));
        // NBD_INFO_EXPORT: size 1 MiB, flags 0x09ed
        let flags: u16 = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0100 | 0x0800;
        assert_eq!(flags, 0x09ed);
        assert_eq!(
            reps[3],
            (
                OPT_GO,
                REP_INFO,
                vec![0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x09, 0xed]
            )
        );
        assert_eq!(reps[4], (OPT_GO, REP_INFO, vec![0, 1, b'v', b'o', b'l']));
        assert_eq!(
            reps[5],
            (
                OPT_GO,
                REP_INFO,
                vec![0, 3, 0, 0, 2, 0, 0, 1, 0, 0, 0x02, 0, 0, 0]
            )
        );
        assert_eq!(reps[6], (OPT_GO, REP_ACK, vec![]));
        assert_eq!(reps.len(), 7);
    }

    #[test]
    fn unknown_option_is_unsupported_and_negotiation_continues() {
        let mut c = 1u32.to_be_bytes().to_vec();
        opt(&mut c, 0x1234, b"junk");
        opt(&mut c, OPT_GO, &go_payload("", &[]));
        let (r, out) = run(c);
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("closed")
        };
        assert_eq!(n.name, "vol"); // the default export
        assert!(!n.structured && n.contexts.is_empty());
        let reps = replies(&out[18..]);
        assert_eq!(reps[0].0, 0x1234);
        assert_eq!(reps[0].1, REP_ERR_UNSUP);
        assert_eq!(reps.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn unknown_export_gets_err_unknown_with_message() {
        let c = client(&[(OPT_GO, &go_payload("nope", &[])), (OPT_ABORT, &[])]);
        let (r, out) = run(c);
        assert!(matches!(r.unwrap(), Outcome::Closed));
        let reps = replies(&out[18..]);
        assert_eq!(reps[0].1, REP_ERR_UNKNOWN);
        assert!(String::from_utf8(reps[0].2.clone())
            .unwrap()
            .contains("nope"));
        assert_eq!(reps[1], (OPT_ABORT, REP_ACK, vec![]));
    }

    #[test]
    fn bad_lengths_get_err_invalid() {
        let mut c = 3u32.to_be_bytes().to_vec();
        // name length says 10 but only 3 bytes follow
        let mut bad = 10u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"vol\0\0");
        opt(&mut c, OPT_GO, &bad);
        // trailing garbage after the info list
        let mut trailing = go_payload("vol", &[]);
        trailing.push(0);
        opt(&mut c, OPT_INFO, &trailing);
        opt(&mut c, OPT_LIST, b"x");
        opt(&mut c, OPT_STRUCTURED_REPLY, b"x");
        // SET_META_CONTEXT before structured replies
        opt(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_payload("vol", &["base:allocation"]),
        );
        let (r, out) = run(c);
        assert!(matches!(r.unwrap(), Outcome::Closed)); // EOF after the options
        let reps = replies(&out[18..]);
        let kinds: Vec<_> = reps.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_GO, REP_ERR_INVALID),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_LIST, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
            ]
        );
    }

    #[test]
    fn list_and_list_meta_context() {
        let c = client(&[
            (OPT_LIST, &[]),
            (OPT_LIST_META_CONTEXT, &meta_payload("vol", &[])),
            (OPT_LIST_META_CONTEXT, &meta_payload("vol", &["other:x"])),
        ]);
        let (_, out) = run(c);
        let reps = replies(&out[18..]);
        assert_eq!(reps[0], (OPT_LIST, REP_SERVER, b"\0\0\0\x03vol".to_vec()));
        assert_eq!(
            reps[1],
            (OPT_LIST, REP_SERVER, b"\0\0\0\x08vol@snap".to_vec())
        );
        assert_eq!(reps[2], (OPT_LIST, REP_ACK, vec![]));
        let context = |id: u8, name: &str| {
            let mut p = vec![0, 0, 0, id];
            p.extend_from_slice(name.as_bytes());
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, p)
        };
        assert_eq!(reps[3], context(1, "base:allocation"));
        assert_eq!(reps[4], context(2, "qemu:dirty-bitmap:snap"));
        assert_eq!(reps[5], (OPT_LIST_META_CONTEXT, REP_ACK, vec![]));
        assert_eq!(reps[6], (OPT_LIST_META_CONTEXT, REP_ACK, vec![]));
    }

    /// QEMU's names and namespace queries: a snapshot older than the
    /// export is a `qemu:dirty-bitmap:` context; SET takes exact names only.
    #[test]
    fn dirty_bitmap_contexts_are_listed_and_selected_by_name() {
        let c = client(&[
            (OPT_STRUCTURED_REPLY, &[]),
            (OPT_LIST_META_CONTEXT, &meta_payload("vol", &["qemu:"])),
            (
                OPT_LIST_META_CONTEXT,
                &meta_payload("vol@snap", &["qemu:dirty-bitmap:"]),
            ),
            (OPT_SET_META_CONTEXT, &meta_payload("vol", &["qemu:"])),
            (
                OPT_SET_META_CONTEXT,
                &meta_payload(
                    "vol",
                    &[
                        "qemu:dirty-bitmap:snap",
                        "qemu:dirty-bitmap:nope",
                        "base:allocation",
                        "qemu:dirty-bitmap:snap",
                    ],
                ),
            ),
            (OPT_GO, &go_payload("vol", &[])),
        ]);
        let (r, out) = run(c);
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("closed")
        };
        assert_eq!(
            n.contexts,
            [
                MetaContext::BaseAllocation,
                MetaContext::DirtyBitmap("snap".into())
            ]
        );
        let reps: Vec<_> = replies(&out[18..])
            .into_iter()
            .filter(|r| r.0 != OPT_GO)
            .collect();
        let context = |option, id: u8, name: &str| {
            let mut p = vec![0, 0, 0, id];
            p.extend_from_slice(name.as_bytes());
            (option, REP_META_CONTEXT, p)
        };
        let ack = |option| (option, REP_ACK, vec![]);
        assert_eq!(
            reps[1..],
            [
                context(OPT_LIST_META_CONTEXT, 1, "qemu:dirty-bitmap:snap"),
                ack(OPT_LIST_META_CONTEXT),
                ack(OPT_LIST_META_CONTEXT),
                ack(OPT_SET_META_CONTEXT),
                context(OPT_SET_META_CONTEXT, 1, "base:allocation"),
                context(OPT_SET_META_CONTEXT, 2, "qemu:dirty-bitmap:snap"),
                ack(OPT_SET_META_CONTEXT),
            ]
        );
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        for (client_flags, tail) in [(3u32, 10usize), (1, 134)] {
            let mut c = client_flags.to_be_bytes().to_vec();
            opt(&mut c, OPT_EXPORT_NAME, b"vol@snap");
            let (r, out) = run(c);
            let Outcome::Transmission(n) = r.unwrap() else {
                panic!()
            };
            assert!(n.export.read_only());
            assert_eq!(out.len(), 18 + tail);
            assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
            // HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN
            assert_eq!(&out[26..28], &[0x01, 0x07]);
        }
    }

    #[test]
    fn garbage_closes_the_connection() {
        // unknown client flags
        assert!(run(0x80u32.to_be_bytes().to_vec()).0.is_err());
        // bad option magic
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend_from_slice(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
        assert!(run(c).0.is_err());
        // option too long
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend_from_slice(b"IHAVEOPT\0\0\0\x07\x10\0\0\0");
        assert!(run(c).0.is_err());
        // EXPORT_NAME with an unknown export
        let c = client(&[(OPT_EXPORT_NAME, b"nope")]);
        assert!(run(c).0.is_err());
    }

    #[test]
    fn context_for_another_export_does_not_carry_over() {
        let c = client(&[
            (OPT_STRUCTURED_REPLY, &[]),
            (
                OPT_SET_META_CONTEXT,
                &meta_payload("vol@snap", &["base:allocation"]),
            ),
            (OPT_GO, &go_payload("vol", &[])),
        ]);
        let Outcome::Transmission(n) = run(c).0.unwrap() else {
            panic!()
        };
        assert!(n.structured && n.contexts.is_empty());
    }

    #[test]
    fn meta_request_parser_refuses_absurd_counts() {
        let mut p = meta_payload("vol", &[]);
        p.truncate(p.len() - 4);
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&p), None);
        assert_eq!(
            parse_meta_request(&meta_payload("v", &["a", "b"])),
            Some(MetaRequest {
                name: "v",
                queries: vec!["a", "b"]
            })
        );
        assert_eq!(preferred_block_size(65536), 65536);
        assert_eq!(preferred_block_size(3000), 4096);
    }

    #[test]
    fn starttls_is_acknowledged_and_nothing_from_plain_text_carries_over() {
        let policy = tls(TlsMode::On);
        let c = client(&[(OPT_STRUCTURED_REPLY, &[]), (OPT_STARTTLS, &[])]);
        let (r, out) = run_with(&policy, c);
        let Outcome::StartTls(resume) = r.unwrap() else {
            panic!("no STARTTLS")
        };
        let reps = replies(&out[18..]);
        assert_eq!(reps[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        assert_eq!(reps[1], (OPT_STARTTLS, REP_ACK, vec![]));
        assert_eq!(reps.len(), 2);

        let (r, out) = after_tls(
            &policy,
            resume,
            &[(OPT_STARTTLS, &[]), (OPT_GO, &go_payload("vol", &[]))],
        );
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("closed")
        };
        // Structured replies were negotiated in plain text: forgotten.
        assert!(!n.structured);
        let reps = replies(&out);
        assert_eq!((reps[0].0, reps[0].1), (OPT_STARTTLS, REP_ERR_INVALID));
        assert_eq!(reps.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn plain_client_works_when_tls_is_only_offered() {
        let c = client(&[(OPT_GO, &go_payload("vol", &[]))]);
        let (r, _) = run_with(&tls(TlsMode::On), c);
        assert!(matches!(r.unwrap(), Outcome::Transmission(_)));
    }

    #[test]
    fn tls_required_refuses_all_but_starttls_and_abort() {
        let policy = tls(TlsMode::Require);
        let c = client(&[
            (OPT_LIST, &[]),
            (OPT_STRUCTURED_REPLY, &[]),
            (OPT_GO, &go_payload("vol", &[])),
            (OPT_STARTTLS, &[]),
        ]);
        let (r, out) = run_with(&policy, c);
        let Outcome::StartTls(resume) = r.unwrap() else {
            panic!("no STARTTLS")
        };
        let reps = replies(&out[18..]);
        let kinds: Vec<_> = reps.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            [
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ACK),
            ]
        );
        assert!(String::from_utf8_lossy(&reps[0].2).contains("TLS is required"));
        // Inside TLS the same options work.
        let (r, _) = after_tls(&policy, resume, &[(OPT_GO, &go_payload("vol", &[]))]);
        assert!(matches!(r.unwrap(), Outcome::Transmission(_)));

        // EXPORT_NAME cannot be answered with an error: the connection ends.
        let (r, _) = run_with(&policy, client(&[(OPT_EXPORT_NAME, b"vol")]));
        assert!(r.is_err());
        let (r, out) = run_with(&policy, client(&[(OPT_ABORT, &[])]));
        assert!(matches!(r.unwrap(), Outcome::Closed));
        assert_eq!(replies(&out[18..]), [(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn starttls_without_tls_configured_is_refused_by_policy() {
        let c = client(&[(OPT_STARTTLS, &[]), (OPT_GO, &go_payload("vol", &[]))]);
        let (r, out) = run_with(&tls(TlsMode::Off), c);
        assert!(matches!(r.unwrap(), Outcome::Transmission(_)));
        let reps = replies(&out[18..]);
        assert_eq!((reps[0].0, reps[0].1), (OPT_STARTTLS, REP_ERR_POLICY));
    }

    #[test]
    fn refused_peer_gets_the_reason_for_every_option_and_no_export() {
        let policy = Policy {
            tls: TlsMode::On,
            refused: Some("permission denied: uid 7 may not".into()),
            caller: None,
        };
        let c = client(&[
            (OPT_LIST, &[]),
            (OPT_STARTTLS, &[]),
            (OPT_GO, &go_payload("vol", &[])),
            (OPT_ABORT, &[]),
        ]);
        let (r, out) = run_with(&policy, c);
        assert!(matches!(r.unwrap(), Outcome::Closed));
        let reps = replies(&out[18..]);
        for (option, rep) in [OPT_LIST, OPT_STARTTLS, OPT_GO].iter().zip(&reps) {
            assert_eq!((rep.0, rep.1), (*option, REP_ERR_POLICY));
            assert_eq!(rep.2, b"permission denied: uid 7 may not");
        }
        assert_eq!(reps[3], (OPT_ABORT, REP_ACK, vec![]));
        let (r, _) = run_with(&policy, client(&[(OPT_EXPORT_NAME, b"vol")]));
        assert!(r.is_err());
    }
}
