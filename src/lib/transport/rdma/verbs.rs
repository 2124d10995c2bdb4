//! The few ibverbs calls the rdma transport needs, behind types that free
//! what they hold. `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and
//! `ibv_req_notify_cq` are inline functions in `verbs.h`; they are called
//! here through the context's ops table, as the header does.

use std::ffi::CStr;
use std::io;
use std::ptr;

use ibverbs_sys as sys;

/// What went wrong, with the verb that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// No RDMA device on this host (or none by the configured name).
    #[error("{0}")]
    NoDevice(String),
    /// A verb failed.
    #[error("{verb}: {source}")]
    Call {
        /// The verb.
        verb: &'static str,
        /// errno.
        source: io::Error,
    },
}

fn fail(verb: &'static str) -> VerbsError {
    VerbsError::Call {
        verb,
        source: io::Error::last_os_error(),
    }
}

fn check(verb: &'static str, rc: i32) -> Result<(), VerbsError> {
    if rc == 0 {
        Ok(())
    } else {
        // Verbs return a positive errno (or -1 with errno set).
        let source = if rc > 0 {
            io::Error::from_raw_os_error(rc)
        } else {
            io::Error::last_os_error()
        };
        Err(VerbsError::Call { verb, source })
    }
}

/// The names of the RDMA devices of this host.
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let mut n = 0;
    // SAFETY: returns an array of n device pointers (or null), freed below.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(VerbsError::NoDevice(format!(
            "no RDMA devices: the verbs library found no kernel support ({e}); on a host without an \
             RDMA NIC, load Soft-RoCE (modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0) \
             or use transport = \"tcp\""
        )));
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: i < n entries of the list; the name is a C string owned by the device.
        unsafe {
            let dev = *list.add(i);
            names.push(
                CStr::from_ptr(sys::ibv_get_device_name(dev))
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: the list from ibv_get_device_list, freed once.
    unsafe { sys::ibv_free_device_list(list) };
    Ok(names)
}

/// An open device with one protection domain, one completion queue (with a
/// completion channel, for sleeping) and the port we use.
pub struct Device {
    ctx: *mut sys::ibv_context,
    pd: *mut sys::ibv_pd,
    channel: *mut sys::ibv_comp_channel,
    cq: *mut sys::ibv_cq,
    /// The device's name.
    pub name: String,
    /// The port (1).
    pub port: u8,
    /// The GID index used (RoCE needs a GID).
    pub gid_index: u8,
    /// This port's GID.
    pub gid: [u8; 16],
    /// This port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The active MTU (an `ibv_mtu` value).
    pub mtu: u32,
}

// SAFETY: the verbs objects are used from one thread at a time (the owner's).
unsafe impl Send for Device {}

impl Device {
    /// Opens `name`, or the first device when None, with a completion queue of `cqe` entries.
    pub fn open(name: Option<&str>, cqe: i32) -> Result<Device, VerbsError> {
        let mut n = 0;
        // SAFETY: as in device_names.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() || n <= 0 {
            if !list.is_null() {
                // SAFETY: freed once.
                unsafe { sys::ibv_free_device_list(list) };
            }
            return Err(VerbsError::NoDevice(
                "no RDMA device on this host (ibv_get_device_list found none): load Soft-RoCE \
                 (modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0) or use transport = \"tcp\""
                    .into(),
            ));
        }
        let mut chosen: *mut sys::ibv_device = ptr::null_mut();
        let mut found = Vec::new();
        for i in 0..n as usize {
            // SAFETY: i < n.
            let (dev, dev_name) = unsafe {
                let dev = *list.add(i);
                let s = CStr::from_ptr(sys::ibv_get_device_name(dev))
                    .to_string_lossy()
                    .into_owned();
                (dev, s)
            };
            if chosen.is_null() && name.is_none_or(|w| w == dev_name) {
                chosen = dev;
            }
            found.push(dev_name);
        }
        // SAFETY: a device from the list; the list is freed after opening (allowed by verbs).
        let ctx = if chosen.is_null() {
            ptr::null_mut()
        } else {
            unsafe { sys::ibv_open_device(chosen) }
        };
        let open_err = io::Error::last_os_error();
        // SAFETY: freed once.
        unsafe { sys::ibv_free_device_list(list) };
        if chosen.is_null() {
            return Err(VerbsError::NoDevice(format!(
                "no RDMA device named {:?} (this host has: {})",
                name.unwrap_or_default(),
                found.join(", ")
            )));
        }
        if ctx.is_null() {
            return Err(VerbsError::Call {
                verb: "ibv_open_device",
                source: open_err,
            });
        }
        let mut dev = Device {
            ctx,
            pd: ptr::null_mut(),
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            name: found
                .into_iter()
                .find(|d| name.is_none_or(|w| w == d))
                .unwrap_or_default(),
            port: 1,
            gid_index: 0,
            gid: [0; 16],
            lid: 0,
            mtu: sys::IBV_MTU_1024,
        };
        // SAFETY: ctx is open; each object is checked and freed by Drop.
        unsafe {
            dev.pd = sys::ibv_alloc_pd(ctx);
            if dev.pd.is_null() {
                return Err(fail("ibv_alloc_pd"));
            }
            dev.channel = sys::ibv_create_comp_channel(ctx);
            if dev.channel.is_null() {
                return Err(fail("ibv_create_comp_channel"));
            }
            let fd = (*dev.channel).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            dev.cq = sys::ibv_create_cq(ctx, cqe, ptr::null_mut(), dev.channel, 0);
            if dev.cq.is_null() {
                return Err(fail("ibv_create_cq"));
            }
            let mut attr: sys::ibv_port_attr = std::mem::zeroed();
            check(
                "ibv_query_port",
                sys::ibv_query_port(ctx, dev.port, &mut attr as *mut _ as *mut _),
            )?;
            if attr.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
                return Err(VerbsError::NoDevice(format!(
                    "RDMA device {} port {} is not active (state {}): is its network interface up?",
                    dev.name, dev.port, attr.state
                )));
            }
            dev.lid = attr.lid;
            dev.mtu = attr.active_mtu;
            // RoCE: prefer the IPv4-mapped GID (RoCE v2), else the first one set.
            let mut first = None;
            for i in 0..attr.gid_tbl_len.clamp(0, 256) {
                let mut gid: sys::ibv_gid = std::mem::zeroed();
                if sys::ibv_query_gid(ctx, dev.port, i, &mut gid) != 0 {
                    continue;
                }
                let raw = gid.raw;
                if raw == [0; 16] {
                    continue;
                }
                let v4 = raw[..10] == [0; 10] && raw[10..12] == [0xff, 0xff];
                if v4 {
                    first = Some((i, raw));
                    break;
                }
                first.get_or_insert((i, raw));
            }
            if let Some((i, raw)) = first {
                dev.gid_index = i as u8;
                dev.gid = raw;
            } else if dev.lid == 0 {
                return Err(VerbsError::NoDevice(format!(
                    "RDMA device {} has neither a GID nor a LID: give its network interface an address",
                    dev.name
                )));
            }
        }
        Ok(dev)
    }

    /// The completion channel's file descriptor (non-blocking; readable when
    /// the queue has news after [`Device::arm`]).
    pub fn event_fd(&self) -> i32 {
        // SAFETY: the channel lives as long as self.
        unsafe { (*self.channel).fd }
    }

    /// Asks for one event on the channel at the next completion.
    pub fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: ops table of an open context; cq is ours.
        unsafe {
            let f = (*(*self.cq).context)
                .ops
                .req_notify_cq
                .expect("req_notify_cq");
            check("ibv_req_notify_cq", f(self.cq, 0))
        }
    }

    /// Takes the events waiting on the channel (without blocking); how many.
    pub fn take_events(&self) -> u32 {
        let mut n = 0;
        loop {
            let mut cq = ptr::null_mut();
            let mut cq_ctx = ptr::null_mut();
            // SAFETY: non-blocking channel: returns -1 (EAGAIN) when empty.
            let rc = unsafe { sys::ibv_get_cq_event(self.channel, &mut cq, &mut cq_ctx) };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges the events just taken.
            unsafe { sys::ibv_ack_cq_events(self.cq, n) };
        }
        n
    }

    /// Polls up to `wc.len()` completions; how many were filled.
    pub fn poll(&self, wc: &mut [sys::ibv_wc]) -> Result<usize, VerbsError> {
        // SAFETY: ops table of an open context; wc has room for len entries.
        let n = unsafe {
            let f = (*(*self.cq).context).ops.poll_cq.expect("poll_cq");
            f(self.cq, wc.len() as i32, wc.as_mut_ptr())
        };
        if n < 0 {
            return Err(VerbsError::Call {
                verb: "ibv_poll_cq",
                source: io::Error::other(format!("returned {n}")),
            });
        }
        Ok(n as usize)
    }

    /// Registers `len` bytes of fresh zeroed memory for local and remote writes.
    pub fn register(&self, len: usize) -> Result<Region, VerbsError> {
        // SAFETY: anonymous private mapping, unmapped by Region's Drop.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(fail("mmap"));
        }
        let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        // SAFETY: the memory just mapped, len bytes.
        let mr = unsafe { sys::ibv_reg_mr(self.pd, ptr, len, access as i32) };
        if mr.is_null() {
            let e = fail("ibv_reg_mr");
            // SAFETY: the mapping above.
            unsafe { libc::munmap(ptr, len) };
            return Err(e);
        }
        Ok(Region {
            mr,
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// A reliable-connected queue pair, in state INIT.
    pub fn queue_pair(&self, send_wr: u32, recv_wr: u32) -> Result<QueuePair, VerbsError> {
        // SAFETY: zeroed init attributes are valid; filled below.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = self.cq;
        init.recv_cq = self.cq;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = send_wr;
        init.cap.max_recv_wr = recv_wr;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and cq are ours; the qp is destroyed by Drop.
        let qp = unsafe { sys::ibv_create_qp(self.pd, &mut init) };
        if qp.is_null() {
            return Err(fail("ibv_create_qp"));
        }
        let qp = QueuePair { qp };
        // SAFETY: zeroed attributes are valid; the mask names what is set.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.port;
        a.qp_access_flags = sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        use sys::ibv_qp_attr_mask as M;
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_PKEY_INDEX.0
            | M::IBV_QP_PORT.0
            | M::IBV_QP_ACCESS_FLAGS.0;
        qp.modify(&mut a, mask, "ibv_modify_qp(INIT)")?;
        Ok(qp)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: each object was made by this Device and is freed once, in order.
        unsafe {
            if !self.cq.is_null() {
                sys::ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                sys::ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                sys::ibv_dealloc_pd(self.pd);
            }
            sys::ibv_close_device(self.ctx);
        }
    }
}

/// Registered memory. Must be dropped before its [`Device`].
pub struct Region {
    mr: *mut sys::ibv_mr,
    /// Start.
    pub ptr: *mut u8,
    /// Length.
    pub len: usize,
}

// SAFETY: plain memory and a registration handle, used by one thread at a time.
unsafe impl Send for Region {}

impl Region {
    /// The key for local work requests.
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr lives as long as self.
        unsafe { (*self.mr).lkey }
    }
    /// The key a peer uses to write here.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
    /// The address a peer writes to.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: registered and mapped by Device::register, freed once.
        unsafe {
            sys::ibv_dereg_mr(self.mr);
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// Where a peer's queue pair is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// GID (RoCE) …
    pub gid: [u8; 16],
    /// … or LID (InfiniBand).
    pub lid: u16,
}

/// One RDMA WRITE: `len` bytes from `local` (in a region with `lkey`) to
/// `remote` (in the peer's region with `rkey`).
#[derive(Clone, Copy, Debug)]
pub struct Write {
    /// Local address.
    pub local: u64,
    /// Its region's lkey.
    pub lkey: u32,
    /// Bytes.
    pub len: u32,
    /// Remote address.
    pub remote: u64,
    /// The peer region's rkey.
    pub rkey: u32,
}

/// A reliable-connected queue pair. Must be dropped before its [`Device`].
pub struct QueuePair {
    qp: *mut sys::ibv_qp,
}

// SAFETY: used by one thread at a time.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// This queue pair's number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: qp lives as long as self.
        unsafe { (*self.qp).qp_num }
    }

    fn modify(
        &self,
        a: &mut sys::ibv_qp_attr,
        mask: u32,
        verb: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: a valid qp and attributes.
        check(verb, unsafe {
            sys::ibv_modify_qp(self.qp, a, sys::ibv_qp_attr_mask(mask).0 as i32)
        })
    }

    /// INIT → RTR → RTS, connected to `remote`, sending from `my_psn`.
    pub fn connect(&self, dev: &Device, remote: &Endpoint, my_psn: u32) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as M;
        // SAFETY: zeroed attributes are valid; filled below.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = dev.mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12; // 0.64 ms
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = dev.port;
        if remote.gid != [0; 16] {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = remote.gid;
            a.ah_attr.grh.sgid_index = dev.gid_index;
            a.ah_attr.grh.hop_limit = 1;
        }
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_AV.0
            | M::IBV_QP_PATH_MTU.0
            | M::IBV_QP_DEST_QPN.0
            | M::IBV_QP_RQ_PSN.0
            | M::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | M::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, mask, "ibv_modify_qp(RTR)")?;
        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = my_psn;
        // 4.096 µs · 2^14 ≈ 67 ms per try, 7 retries: a lost peer's queue
        // pair errs after about half a second. Never 0 (wait forever).
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.max_rd_atomic = 1;
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_TIMEOUT.0
            | M::IBV_QP_RETRY_CNT.0
            | M::IBV_QP_RNR_RETRY.0
            | M::IBV_QP_SQ_PSN.0
            | M::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, mask, "ibv_modify_qp(RTS)")
    }

    /// Posts `writes` as one chain; the last one is signalled with `wr_id`
    /// and, when `imm` is set, carries it as immediate data (the peer gets a
    /// receive completion, which wakes it).
    pub fn post_writes(
        &self,
        writes: &[Write],
        wr_id: u64,
        imm: Option<u32>,
    ) -> Result<(), VerbsError> {
        let mut sges: Vec<sys::ibv_sge> = writes
            .iter()
            .map(|w| sys::ibv_sge {
                addr: w.local,
                length: w.len,
                lkey: w.lkey,
            })
            .collect();
        // SAFETY: zeroed work requests are valid; filled below.
        let mut wrs: Vec<sys::ibv_send_wr> = (0..writes.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let n = wrs.len();
        let base = wrs.as_mut_ptr();
        for (i, (wr, w)) in wrs.iter_mut().zip(writes).enumerate() {
            wr.wr_id = wr_id;
            wr.sg_list = &mut sges[i];
            wr.num_sge = 1;
            wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            wr.wr.rdma.remote_addr = w.remote;
            wr.wr.rdma.rkey = w.rkey;
            if i + 1 < n {
                // SAFETY: i + 1 < n: inside the vector, which outlives the post.
                wr.next = unsafe { base.add(i + 1) };
            } else {
                wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
                if let Some(imm) = imm {
                    wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                    wr.__bindgen_anon_1.imm_data = imm.to_be();
                }
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut bad = ptr::null_mut();
        // SAFETY: a chain of n valid work requests whose sges outlive the call
        // (the verbs copy them into the send queue).
        let rc = unsafe {
            let f = (*(*self.qp).context).ops.post_send.expect("post_send");
            f(self.qp, base, &mut bad)
        };
        check("ibv_post_send", rc)
    }

    /// Posts `n` empty receives (RDMA WRITE with immediate consumes one each).
    pub fn post_recvs(&self, n: usize, wr_id: u64) -> Result<(), VerbsError> {
        for _ in 0..n {
            // SAFETY: zeroed is a valid receive request with no scatter entries.
            let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = wr_id;
            let mut bad = ptr::null_mut();
            // SAFETY: one valid request.
            let rc = unsafe {
                let f = (*(*self.qp).context).ops.post_recv.expect("post_recv");
                f(self.qp, &mut wr, &mut bad)
            };
            check("ibv_post_recv", rc)?;
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: made by Device::queue_pair, destroyed once.
        unsafe { sys::ibv_destroy_qp(self.qp) };
    }
}
