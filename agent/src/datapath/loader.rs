//! Loads `signet-bpf`'s objects into the kernel, pins maps and links under one folder per node
//! (`/sys/fs/bpf/signet/<node>/{maps,links}`), attaches the socket programs to the node's cgroup
//! and the tc program to endpoint interfaces, and writes the maps.
//!
//! Restart safety: maps and links are pinned, so enforcement continues while the agent is down.
//! A restarted agent reuses pinned maps (the objects are loaded with the same pin folder) and
//! pinned links (it never attaches a second copy), then reconciles map contents by diff.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SchedClassifier, SockOps, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use signet_bpf::map_names as names;
use signet_bpf::maps::{
    ClientKey, Config, EndpointValue, FlowEvent, IPCACHE_MESH, IPCACHE_SERVICE, IpcacheValue,
    OrigDst, PolicyKey, PolicyValue, addr16, ip_from16,
};
use signet_bpf::programs;
use signet_policy::compile::Compiled;

use super::{
    Datapath, DatapathConfig, DatapathError, EndpointKey, IpcacheEntry, PolicyChanges,
    PolicyKeyOrd, bpffs, desired_policy, fits,
};

/// Map sizes, applied when the maps are created (pinned maps keep the size they were made with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub ipcache: u32,
    pub endpoints: u32,
    pub policy: u32,
    pub orig: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            ipcache: 65_536,
            endpoints: 4_096,
            policy: 65_536,
            orig: 65_536,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// This node's pin folder, e.g. `/sys/fs/bpf/signet/node-a`.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose subtree holds this node's pods.
    pub cgroup: PathBuf,
    pub sizes: MapSizes,
}

impl LoaderConfig {
    /// The standard layout: pins under `/sys/fs/bpf/signet/<node>`.
    pub fn for_node(node: &str, cgroup: PathBuf) -> Self {
        Self {
            pin_dir: PathBuf::from(bpffs::BPFFS).join("signet").join(node),
            cgroup,
            sizes: MapSizes::default(),
        }
    }
}

/// The datapath in the kernel.
pub struct KernelDatapath {
    pin_dir: PathBuf,
    /// Loaded objects whose programs are attached per interface (towards and from the pod).
    tc_to: Ebpf,
    tc_from: Ebpf,
    excluded_ports: HashMap<MapData, u16, u8>,
    ipcache: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    ep_netns: HashMap<MapData, u64, EndpointValue>,
    ep_ifindex: HashMap<MapData, u32, EndpointValue>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    config: Array<MapData, Config>,
    orig: OriginalDestinations,
    events: RingBuf<MapData>,
    capacity: super::Capacity,
    /// The kernel's id of `signet_ep_ifindex`: tells our tc programs from anyone else's.
    ep_ifindex_map_id: u32,
}

impl std::fmt::Debug for KernelDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDatapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn load_object(
    obj: signet_bpf::Object,
    maps_dir: &Path,
    sizes: MapSizes,
) -> Result<Ebpf, DatapathError> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .map_max_entries(names::IPCACHE, sizes.ipcache)
        .map_max_entries(names::EP_NETNS, sizes.endpoints)
        .map_max_entries(names::EP_IFINDEX, sizes.endpoints)
        .map_max_entries(names::POLICY, sizes.policy)
        .map_max_entries(names::ORIG_BY_COOKIE, sizes.orig)
        .map_max_entries(names::ORIG_BY_CLIENT, sizes.orig)
        .load(obj.bytes)
        .map_err(|e| DatapathError::Load {
            object: obj.name,
            reason: chain(&e),
        })
}

fn open_map(
    maps_dir: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(maps_dir.join(name)).map_err(|e| DatapathError::Map {
        map: name,
        reason: format!("opening pin: {e}"),
    })?;
    Ok(wrap(data))
}

/// An error with its sources, so an errno from the kernel is not lost.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        reason: chain(&e),
    }
}

impl KernelDatapath {
    /// The datapath of the agent's configuration: pinned under `datapath.bpffsDir`, attached to
    /// `datapath.cgroupRoot`, capturing to the outbound listener, strict or permissive, with the
    /// excluded ports.
    pub fn for_agent(config: &crate::config::AgentConfig) -> Result<Self, DatapathError> {
        let mut datapath = Self::load(&LoaderConfig {
            pin_dir: config.datapath.bpffs_dir.clone(),
            cgroup: config.datapath.cgroup_root.clone(),
            sizes: MapSizes::default(),
        })?;
        let (proxy_v4, proxy_v6) = match config.listen.outbound.ip() {
            std::net::IpAddr::V4(v4) => (v4, None),
            std::net::IpAddr::V6(v6) => (std::net::Ipv4Addr::UNSPECIFIED, Some(v6)),
        };
        datapath.set_config(&DatapathConfig {
            proxy_v4,
            proxy_v6,
            proxy_port: config.listen.outbound.port(),
            strict: config.datapath.mtls_mode == crate::config::MtlsMode::Strict,
            proxy_mark: config.datapath.proxy_mark,
            event_sample: 0,
        })?;
        datapath.set_excluded_ports(&config.datapath.excluded_ports)?;
        Ok(datapath)
    }

    /// Loads (or finds, after a restart) everything under `cfg.pin_dir` and attaches the socket
    /// programs to `cfg.cgroup`.
    pub fn load(cfg: &LoaderConfig) -> Result<Self, DatapathError> {
        bpffs::ensure_mounted()?;
        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        fs::create_dir_all(&maps_dir).map_err(io(&maps_dir))?;
        fs::create_dir_all(&links_dir).map_err(io(&links_dir))?;

        let cgroup = fs::File::open(&cfg.cgroup).map_err(io(&cfg.cgroup))?;
        let mut connect = load_object(signet_bpf::SOCK_CONNECT, &maps_dir, cfg.sizes)?;
        let mut getpeername = load_object(signet_bpf::SOCK_GETPEERNAME, &maps_dir, cfg.sizes)?;
        let mut sockops = load_object(signet_bpf::SOCKOPS, &maps_dir, cfg.sizes)?;
        let tc_to = load_object(signet_bpf::TC_TO_ENDPOINT, &maps_dir, cfg.sizes)?;
        let tc_from = load_object(signet_bpf::TC_FROM_ENDPOINT, &maps_dir, cfg.sizes)?;

        let target = cfg.cgroup.display().to_string();
        for (obj, name) in [
            (&mut connect, programs::CONNECT4),
            (&mut getpeername, programs::GETPEERNAME4),
        ] {
            attach_sock_addr(obj, name, &cgroup, &links_dir.join(name), &target)?;
        }
        for (obj, name) in [
            (&mut connect, programs::CONNECT6),
            (&mut getpeername, programs::GETPEERNAME6),
        ] {
            attach_sock_addr(obj, name, &cgroup, &links_dir.join(name), &target)?;
        }
        for name in [programs::SENDMSG4, programs::SENDMSG6] {
            attach_sock_addr(&mut connect, name, &cgroup, &links_dir.join(name), &target)?;
        }
        attach_sockops(
            &mut sockops,
            &cgroup,
            &links_dir.join(programs::SOCKOPS),
            &target,
        )?;

        let policy_map = open_map(&maps_dir, names::POLICY, Map::HashMap)?;
        let ep_ifindex = open_map(&maps_dir, names::EP_IFINDEX, Map::HashMap)?;
        let ep_ifindex_map_id = match &ep_ifindex {
            Map::HashMap(d) => d.info().map_err(map_err(names::EP_IFINDEX))?.id(),
            _ => 0,
        };
        let ipcache_map = open_map(&maps_dir, names::IPCACHE, Map::LpmTrie)?;
        let ep_netns = open_map(&maps_dir, names::EP_NETNS, Map::HashMap)?;
        let max_entries = |m: &Map| match m {
            Map::HashMap(d) | Map::LpmTrie(d) => {
                d.info().map(|i| i.max_entries() as usize).unwrap_or(0)
            }
            _ => 0,
        };
        let capacity = super::Capacity {
            ipcache: max_entries(&ipcache_map),
            endpoints: max_entries(&ep_netns).min(max_entries(&ep_ifindex)),
            policy: max_entries(&policy_map),
        };
        Ok(Self {
            pin_dir: cfg.pin_dir.clone(),
            tc_to,
            tc_from,
            excluded_ports: HashMap::try_from(open_map(
                &maps_dir,
                names::EXCLUDED_PORTS,
                Map::HashMap,
            )?)
            .map_err(map_err(names::EXCLUDED_PORTS))?,
            ipcache: LpmTrie::try_from(ipcache_map).map_err(map_err(names::IPCACHE))?,
            ep_netns: HashMap::try_from(ep_netns).map_err(map_err(names::EP_NETNS))?,
            ep_ifindex: HashMap::try_from(ep_ifindex).map_err(map_err(names::EP_IFINDEX))?,
            policy: HashMap::try_from(policy_map).map_err(map_err(names::POLICY))?,
            config: Array::try_from(open_map(&maps_dir, names::CONFIG, Map::Array)?)
                .map_err(map_err(names::CONFIG))?,
            orig: OriginalDestinations::open(&cfg.pin_dir)?,
            events: RingBuf::try_from(open_map(&maps_dir, names::EVENTS, Map::RingBuf)?)
                .map_err(map_err(names::EVENTS))?,
            capacity,
            ep_ifindex_map_id,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The destination a captured connection asked for, by the client address the proxy saw on
    /// accept, with the destination's identity.
    pub fn original_destination(
        &self,
        client: std::net::SocketAddr,
    ) -> Option<(std::net::SocketAddr, u32)> {
        self.orig.lookup(client)
    }

    /// Drops so far per reason, summed over CPUs.
    pub fn drop_counts(&self) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
        read_drop_counts(&self.pin_dir)
    }

    /// Every flow event waiting in the ring buffer. The programs never wake the reader, so the
    /// agent calls this on a timer.
    pub fn drain_events(&mut self) -> Vec<FlowEvent> {
        super::events::drain_ring(&mut self.events)
    }

    /// Destination ports never captured (e.g. a probe port the kubelet uses).
    pub fn set_excluded_ports(&mut self, ports: &[u16]) -> Result<(), DatapathError> {
        let current: Vec<u16> = self.excluded_ports.keys().filter_map(Result::ok).collect();
        for p in ports {
            if !current.contains(p) {
                self.excluded_ports
                    .insert(p, 1, 0)
                    .map_err(map_err(names::EXCLUDED_PORTS))?;
            }
        }
        for p in current.iter().filter(|p| !ports.contains(p)) {
            self.excluded_ports
                .remove(p)
                .map_err(map_err(names::EXCLUDED_PORTS))?;
        }
        Ok(())
    }
}

/// Pins of tc links are `tc-to-<ifname>` and `tc-from-<ifname>` (or a `.clsact` marker).
const TC_PIN_PREFIX: &str = "tc-";

/// Detaches the link pinned at `pin` from its hook now (`BPF_LINK_DETACH`), leaving the pin (a
/// defunct link) for the caller to remove. aya 0.14 has no call for it.
fn detach_link(pin: &Path) -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    // Every byte initialised: the kernel refuses (EINVAL) an attr whose bytes past the
    // command's last field are not zero, and implicit padding would be whatever was there.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        padding: u32,
    }
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(pin.as_os_str()))
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        padding: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET whose pathname points at a
    // NUL-terminated string that outlives the call; the size passed is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            std::ptr::addr_of!(get),
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let detach: u32 = std::os::fd::AsRawFd::as_raw_fd(&link) as u32;
    // SAFETY: a u32 link_fd is the whole bpf_attr of BPF_LINK_DETACH; the size passed is its.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            std::ptr::addr_of!(detach),
            size_of::<u32>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The interface a tc pin file belongs to.
fn tc_pin_interface(file: &str) -> Option<&str> {
    let rest = file.strip_prefix(TC_PIN_PREFIX)?;
    let name = rest
        .strip_prefix("to-")
        .or_else(|| rest.strip_prefix("from-"))?;
    Some(name.strip_suffix(".clsact").unwrap_or(name))
}

/// Whether the kernel has program `name` attached to `ifname` at `at` over TCX, loaded by this
/// datapath (it uses the map with id `our_map`): not another node's copy, not a stale one.
fn tcx_attached(
    name: &'static str,
    ifname: &str,
    at: TcAttachType,
    our_map: u32,
) -> Result<bool, DatapathError> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, at).map_err(|e| DatapathError::Attach {
        program: name,
        target: ifname.to_owned(),
        reason: format!("listing the programs attached: {}", chain(&e)),
    })?;
    Ok(progs.iter().any(|p| {
        // The kernel keeps 15 characters of a program's name.
        let named = p
            .name_as_str()
            .is_some_and(|n| !n.is_empty() && name.starts_with(n));
        named
            && p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&our_map))
    }))
}

fn attach_tc(
    obj: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    at: TcAttachType,
    pin: &Path,
    our_map: u32,
) -> Result<(), DatapathError> {
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    // A netlink (clsact) filter lives on the interface itself and cannot be queried here, so a
    // marker file records it; a TCX attachment is read from the kernel. Either way an attached
    // program is never attached twice.
    let marker = pin.with_extension("clsact");
    if tcx {
        if tcx_attached(name, ifname, at, our_map)? {
            return Ok(());
        }
        // A pin of this name is left from an interface that went away (its link is defunct).
        match fs::remove_file(pin) {
            Ok(()) => tracing::info!(interface = ifname, "stale tc pin replaced"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Io {
                    path: pin.to_owned(),
                    source,
                });
            }
        }
    } else if marker.exists() {
        return Ok(());
    }
    let prog: &mut SchedClassifier = obj
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::Program {
            program: name,
            reason: "not in the object".into(),
        })?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| DatapathError::Program {
            program: name,
            reason: chain(&e),
        })?;
    }
    let attach_err = |reason: String| DatapathError::Attach {
        program: name,
        target: ifname.to_owned(),
        reason,
    };
    if !tcx {
        // Before TCX: a clsact qdisc carries the filter (it may already be there).
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
            tracing::debug!(ifname, error = %e, "clsact qdisc not added (probably present)");
        }
    }
    let id = prog.attach(ifname, at).map_err(|e| attach_err(chain(&e)))?;
    let link = prog.take_link(id).map_err(|e| attach_err(chain(&e)))?;
    if tcx {
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e| attach_err(format!("TCX link is not an fd link: {e:?}")))?;
        fd_link
            .pin(pin)
            .map_err(|e| attach_err(format!("pinning: {e}")))?;
    } else {
        // The netlink filter stays on the interface after we exit; dropping aya's link object
        // would remove it, so it is forgotten and a marker remembers the attachment.
        std::mem::forget(link);
        fs::write(&marker, ifname).map_err(io(&marker))?;
    }
    Ok(())
}

/// Loads program `name` of type `$ty` from `$obj`, attaches it to `$cgroup` as a bpf_link and
/// pins the link at `$pin`, unless a pinned link is already there (never a second copy).
macro_rules! attach_cgroup_link {
    ($ty:ty, $obj:expr, $name:expr, $cgroup:expr, $pin:expr, $target:expr) => {{
        let (name, pin): (&'static str, &Path) = ($name, $pin);
        if PinnedLink::from_pin(pin).is_ok() {
            return Ok(());
        }
        let attach_err = |reason: String| DatapathError::Attach {
            program: name,
            target: $target.to_owned(),
            reason,
        };
        let prog: &mut $ty = $obj
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::Program {
                program: name,
                reason: "not in the object".into(),
            })?;
        prog.load().map_err(|e| DatapathError::Program {
            program: name,
            reason: chain(&e),
        })?;
        let id = prog
            // bpf_link cgroup attachments are always multi-attach; the kernel rejects any flag
            // on link creation, so `Single` (flags 0) is what gives BPF_F_ALLOW_MULTI semantics.
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(|e| attach_err(chain(&e)))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| attach_err(chain(&e)))?
            .try_into()
            .map_err(|e| attach_err(format!("not an fd link: {e:?}")))?;
        link.pin(pin)
            .map_err(|e| attach_err(format!("pinning: {e}")))?;
        Ok(())
    }};
}

fn attach_sock_addr(
    obj: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
    target: &str,
) -> Result<(), DatapathError> {
    attach_cgroup_link!(CgroupSockAddr, obj, name, cgroup, pin, target)
}

fn attach_sockops(
    obj: &mut Ebpf,
    cgroup: &fs::File,
    pin: &Path,
    target: &str,
) -> Result<(), DatapathError> {
    attach_cgroup_link!(SockOps, obj, programs::SOCKOPS, cgroup, pin, target)
}

/// A read-only handle on the original-destination map, for the proxy's accept path.
pub struct OriginalDestinations {
    map: HashMap<MapData, ClientKey, OrigDst>,
}

impl std::fmt::Debug for OriginalDestinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginalDestinations")
    }
}

impl OriginalDestinations {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let maps_dir = pin_dir.join("maps");
        let map = HashMap::try_from(open_map(&maps_dir, names::ORIG_BY_CLIENT, Map::LruHashMap)?)
            .map_err(map_err(names::ORIG_BY_CLIENT))?;
        Ok(Self { map })
    }

    /// The destination a captured connection asked for, by the client address seen on accept.
    pub fn lookup(&self, client: std::net::SocketAddr) -> Option<(std::net::SocketAddr, u32)> {
        let key = ClientKey {
            addr: addr16(client.ip()),
            port: client.port(),
            _pad: 0,
        };
        let o = self.map.get(&key, 0).ok()?;
        Some((
            std::net::SocketAddr::new(ip_from16(o.addr), o.port),
            o.identity,
        ))
    }
}

/// Drops per reason from the counters pinned under `pin_dir`, summed over CPUs.
pub fn read_drop_counts(pin_dir: &Path) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
    let path = pin_dir.join("maps").join(names::DROPS);
    let data = MapData::from_pin(&path).map_err(|e| DatapathError::Map {
        map: names::DROPS,
        reason: chain(&e),
    })?;
    let drops: aya::maps::PerCpuArray<MapData, u64> =
        aya::maps::PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(names::DROPS))?;
    let mut out = BTreeMap::new();
    for code in 0..signet_bpf::maps::Reason::COUNT as u32 {
        let per_cpu = drops.get(&code, 0).map_err(map_err(names::DROPS))?;
        let total: u64 = per_cpu.iter().sum();
        if total > 0 {
            out.insert(
                signet_bpf::maps::Reason::from_code(code as u8).name(),
                total,
            );
        }
    }
    Ok(out)
}

/// Removes everything the agent pinned under `pin_dir`: unpinning the links detaches the
/// programs, unpinning the maps frees them once no program uses them.
pub fn cleanup(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::Io {
            path: pin_dir.to_owned(),
            source: e,
        }),
    }
}

impl Datapath for KernelDatapath {
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let value = Config {
            proxy_addr4: cfg.proxy_v4.octets(),
            proxy_addr6: cfg.proxy_v6.map(|v| v.octets()).unwrap_or_default(),
            proxy_port: cfg.proxy_port,
            strict: u8::from(cfg.strict),
            _pad: 0,
            proxy_mark: cfg.proxy_mark,
            event_sample: cfg.event_sample,
        };
        self.config.set(0, value, 0).map_err(map_err(names::CONFIG))
    }

    fn reconcile_ipcache(&mut self, entries: &[IpcacheEntry]) -> Result<(), DatapathError> {
        let desired: BTreeMap<(u32, [u8; 16]), IpcacheValue> = entries
            .iter()
            .map(|e| {
                let k = signet_bpf::maps::IpcacheKey::new(e.ip, e.prefix);
                let v = IpcacheValue {
                    identity: e.identity,
                    flags: if e.mesh { IPCACHE_MESH } else { 0 }
                        | if e.service { IPCACHE_SERVICE } else { 0 },
                };
                ((k.prefixlen, k.addr), v)
            })
            .collect();
        let current: BTreeMap<(u32, [u8; 16]), IpcacheValue> = self
            .ipcache
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect();
        let stale = current.keys().filter(|k| !desired.contains_key(k)).count();
        fits(names::IPCACHE, desired.len() + stale, self.capacity.ipcache)?;
        for ((len, addr), v) in &desired {
            if current.get(&(*len, *addr)) != Some(v) {
                self.ipcache
                    .insert(&LpmKey::new(*len, *addr), v, 0)
                    .map_err(map_err(names::IPCACHE))?;
            }
        }
        for (len, addr) in current.keys().filter(|k| !desired.contains_key(k)) {
            self.ipcache
                .remove(&LpmKey::new(*len, *addr))
                .map_err(map_err(names::IPCACHE))?;
        }
        Ok(())
    }

    fn reconcile_endpoints(
        &mut self,
        endpoints: &BTreeMap<EndpointKey, EndpointValue>,
    ) -> Result<(), DatapathError> {
        let current_ns: BTreeMap<u64, EndpointValue> =
            self.ep_netns.iter().filter_map(Result::ok).collect();
        let current_if: BTreeMap<u32, EndpointValue> =
            self.ep_ifindex.iter().filter_map(Result::ok).collect();
        let (mut by_ns, mut by_if) = (0, 0);
        for k in endpoints.keys() {
            match k {
                EndpointKey::Netns(_) => by_ns += 1,
                EndpointKey::Ifindex(_) => by_if += 1,
            }
        }
        let stale_ns = current_ns
            .keys()
            .filter(|id| !endpoints.contains_key(&EndpointKey::Netns(**id)))
            .count();
        let stale_if = current_if
            .keys()
            .filter(|i| !endpoints.contains_key(&EndpointKey::Ifindex(**i)))
            .count();
        fits(names::EP_NETNS, by_ns + stale_ns, self.capacity.endpoints)?;
        fits(names::EP_IFINDEX, by_if + stale_if, self.capacity.endpoints)?;
        for (k, v) in endpoints {
            match k {
                EndpointKey::Netns(id) if current_ns.get(id) != Some(v) => self
                    .ep_netns
                    .insert(id, v, 0)
                    .map_err(map_err(names::EP_NETNS))?,
                EndpointKey::Ifindex(i) if current_if.get(i) != Some(v) => self
                    .ep_ifindex
                    .insert(i, v, 0)
                    .map_err(map_err(names::EP_IFINDEX))?,
                _ => {}
            }
        }
        for id in current_ns
            .keys()
            .filter(|id| !endpoints.contains_key(&EndpointKey::Netns(**id)))
        {
            self.ep_netns.remove(id).map_err(map_err(names::EP_NETNS))?;
        }
        for i in current_if
            .keys()
            .filter(|i| !endpoints.contains_key(&EndpointKey::Ifindex(**i)))
        {
            self.ep_ifindex
                .remove(i)
                .map_err(map_err(names::EP_IFINDEX))?;
        }
        Ok(())
    }

    fn reconcile_policy(&mut self, compiled: &Compiled) -> Result<PolicyChanges, DatapathError> {
        let desired = desired_policy(compiled);
        fits(names::POLICY, desired.len(), self.capacity.policy)?;
        let current = self.policy_entries()?;
        // The map must hold old and new entries together for a moment.
        let stale = current.keys().filter(|k| !desired.contains_key(k)).count();
        fits(names::POLICY, desired.len() + stale, self.capacity.policy)?;
        let mut changes = PolicyChanges::default();
        for (k, v) in &desired {
            if current.get(k) != Some(v) {
                self.policy
                    .insert(k.0, v, 0)
                    .map_err(map_err(names::POLICY))?;
                changes.written += 1;
            }
        }
        for k in current.keys().filter(|k| !desired.contains_key(k)) {
            self.policy.remove(&k.0).map_err(map_err(names::POLICY))?;
            changes.removed += 1;
        }
        Ok(changes)
    }

    fn attached_programs(&self) -> Vec<String> {
        // A pinned link holds its attachment: the pins are what stays attached, even across an
        // agent restart. The per-interface tc links are reported with the interfaces.
        let links = self.pin_dir.join("links");
        let mut names: Vec<String> = fs::read_dir(&links)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| tc_pin_interface(n).is_none())
            .collect();
        names.sort();
        names
    }

    fn capacity(&self) -> super::Capacity {
        self.capacity
    }

    /// Attaches the tc programs to an endpoint's host-side interface: towards the pod (TCX
    /// egress of the host side: ingress policy) and from it (TCX ingress: the connection
    /// table). Whether they are attached already is asked of the kernel (a program of ours, using
    /// this datapath's maps, on the interface), not read from pin names: a veth deleted and
    /// re-created under the same name gets the programs again.
    fn attach_endpoint_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let links = self.pin_dir.join("links");
        let ours = self.ep_ifindex_map_id;
        for (obj, name, at, dir) in [
            (
                &mut self.tc_to,
                programs::TO_ENDPOINT,
                TcAttachType::Egress,
                "to",
            ),
            (
                &mut self.tc_from,
                programs::FROM_ENDPOINT,
                TcAttachType::Ingress,
                "from",
            ),
        ] {
            let pin = links.join(format!("{TC_PIN_PREFIX}{dir}-{ifname}"));
            attach_tc(obj, name, ifname, at, &pin, ours)?;
        }
        Ok(())
    }

    /// Unpins (and so detaches) the tc programs of every interface not in `keep`: endpoints that
    /// went away, and pins left by interfaces that no longer exist.
    fn detach_endpoint_interfaces_except(
        &mut self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<(), DatapathError> {
        let links = self.pin_dir.join("links");
        let entries = fs::read_dir(&links).map_err(io(&links))?;
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(ifname) = tc_pin_interface(&file) else {
                continue;
            };
            if keep.contains(ifname) {
                continue;
            }
            let path = entry.path();
            // Detached first: unlinking the pin alone lets the kernel release the link after an
            // RCU grace period, so the program would stay on the interface for a moment.
            // (A `.clsact` marker is a plain file, not a link.)
            if !file.ends_with(".clsact")
                && let Err(e) = detach_link(&path)
            {
                tracing::warn!(interface = ifname, pin = %path.display(), error = %e, "tc link detach failed; unpinning");
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(interface = ifname, pin = %path.display(), "tc program detached")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Io { path, source }),
            }
        }
        Ok(())
    }

    fn policy_entries(&self) -> Result<BTreeMap<PolicyKeyOrd, PolicyValue>, DatapathError> {
        self.policy
            .iter()
            .map(|r| {
                r.map(|(k, v)| (PolicyKeyOrd(k), v))
                    .map_err(map_err(names::POLICY))
            })
            .collect()
    }
}
