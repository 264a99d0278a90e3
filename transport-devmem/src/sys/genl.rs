//! The generic-netlink controller (`nlctrl`): family resolution and policy introspection.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::errno;
use crate::sys::netlink::{
    AttrSet, DecodeError, GenlMsg, NLM_F_ACK, NLM_F_DUMP, PolicyDesc, PolicyTable, Request, RequestBuilder,
};
use crate::sys::socket::{Mode, NlSocket};

/// `GENL_ID_CTRL`.
pub const GENL_ID_CTRL: u16 = 0x10;
/// Version byte the controller requests use.
pub const CTRL_VERSION: u8 = 2;

pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_CMD_GETPOLICY: u8 = 10;

pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_VERSION: u16 = 3;
pub const CTRL_ATTR_HDRSIZE: u16 = 4;
pub const CTRL_ATTR_MAXATTR: u16 = 5;
pub const CTRL_ATTR_OPS: u16 = 6;
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
pub const CTRL_ATTR_POLICY: u16 = 8;
pub const CTRL_ATTR_OP_POLICY: u16 = 9;
pub const CTRL_ATTR_OP: u16 = 10;

pub const CTRL_ATTR_OP_ID: u16 = 1;
pub const CTRL_ATTR_OP_FLAGS: u16 = 2;
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
pub const CTRL_ATTR_POLICY_DO: u16 = 1;
pub const CTRL_ATTR_POLICY_DUMP: u16 = 2;

/// `GENL_*` op flags.
pub mod op_flags {
    pub const ADMIN_PERM: u32 = 0x01;
    pub const CMD_CAP_DO: u32 = 0x02;
    pub const CMD_CAP_DUMP: u32 = 0x04;
    pub const CMD_CAP_HASPOL: u32 = 0x08;
    pub const UNS_ADMIN_PERM: u32 = 0x10;
}

/// Attribute names of the controller's own set (for extack naming).
pub static CTRL_SET: AttrSet = AttrSet {
    name: "ctrl",
    attrs: &[
        (1, "family-id"),
        (2, "family-name"),
        (3, "version"),
        (4, "hdrsize"),
        (5, "maxattr"),
        (6, "ops"),
        (7, "mcast-groups"),
        (8, "policy"),
        (9, "op-policy"),
        (10, "op"),
    ],
    nests: &[],
};

/// One operation of a family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenlOp {
    /// Command id.
    pub id: u32,
    /// `GENL_*` flags.
    pub flags: u32,
}

impl GenlOp {
    /// Needs `CAP_NET_ADMIN` in the initial user namespace.
    pub fn admin_perm(&self) -> bool {
        self.flags & op_flags::ADMIN_PERM != 0
    }

    /// Needs `CAP_NET_ADMIN` in the netns owner's user namespace.
    pub fn uns_admin_perm(&self) -> bool {
        self.flags & op_flags::UNS_ADMIN_PERM != 0
    }

    /// Accepts `do` requests.
    pub fn can_do(&self) -> bool {
        self.flags & op_flags::CMD_CAP_DO != 0
    }

    /// Accepts dumps.
    pub fn can_dump(&self) -> bool {
        self.flags & op_flags::CMD_CAP_DUMP != 0
    }

    /// `ADMIN_PERM|CAP_DO|...` rendering.
    pub fn flags_str(&self) -> String {
        let names = [
            (op_flags::ADMIN_PERM, "ADMIN_PERM"),
            (op_flags::CMD_CAP_DO, "CAP_DO"),
            (op_flags::CMD_CAP_DUMP, "CAP_DUMP"),
            (op_flags::CMD_CAP_HASPOL, "CAP_HASPOL"),
            (op_flags::UNS_ADMIN_PERM, "UNS_ADMIN_PERM"),
        ];
        names.iter().filter(|(b, _)| self.flags & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
    }
}

/// A multicast group of a family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct McastGroup {
    pub name: String,
    pub id: u32,
}

/// A resolved generic-netlink family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Family {
    pub name: String,
    /// Dynamic family id (the `nlmsg_type` of its requests).
    pub id: u16,
    pub version: u32,
    pub hdrsize: u32,
    pub maxattr: u32,
    pub ops: Vec<GenlOp>,
    pub mcast_groups: Vec<McastGroup>,
}

impl Family {
    /// The op with command id `cmd`.
    pub fn op(&self, cmd: u8) -> Option<&GenlOp> {
        self.ops.iter().find(|o| o.id == cmd as u32)
    }

    /// Decode a `CTRL_CMD_NEWFAMILY` reply.
    pub fn decode(msg: &GenlMsg) -> Result<Self, DecodeError> {
        let mut f = Family {
            name: String::new(),
            id: 0,
            version: 0,
            hdrsize: 0,
            maxattr: 0,
            ops: Vec::new(),
            mcast_groups: Vec::new(),
        };
        for a in msg.attrs()? {
            match a.ty {
                CTRL_ATTR_FAMILY_ID => f.id = a.u16()?,
                CTRL_ATTR_FAMILY_NAME => f.name = a.string(),
                CTRL_ATTR_VERSION => f.version = a.uint()? as u32,
                CTRL_ATTR_HDRSIZE => f.hdrsize = a.uint()? as u32,
                CTRL_ATTR_MAXATTR => f.maxattr = a.uint()? as u32,
                CTRL_ATTR_OPS => {
                    for op in a.nested_attrs()? {
                        let mut o = GenlOp { id: 0, flags: 0 };
                        for x in op.nested_attrs()? {
                            match x.ty {
                                CTRL_ATTR_OP_ID => o.id = x.uint()? as u32,
                                CTRL_ATTR_OP_FLAGS => o.flags = x.uint()? as u32,
                                _ => {}
                            }
                        }
                        f.ops.push(o);
                    }
                }
                CTRL_ATTR_MCAST_GROUPS => {
                    for g in a.nested_attrs()? {
                        let mut m = McastGroup { name: String::new(), id: 0 };
                        for x in g.nested_attrs()? {
                            match x.ty {
                                CTRL_ATTR_MCAST_GRP_NAME => m.name = x.string(),
                                CTRL_ATTR_MCAST_GRP_ID => m.id = x.uint()? as u32,
                                _ => {}
                            }
                        }
                        f.mcast_groups.push(m);
                    }
                }
                _ => {}
            }
        }
        if f.id == 0 {
            return Err(DecodeError("family reply without a family id".into()));
        }
        Ok(f)
    }
}

/// The policies of one op, from `CTRL_CMD_GETPOLICY`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OpPolicy {
    /// Command id.
    pub cmd: u8,
    /// Policy index of the `do` request, if the op has one.
    pub do_policy: Option<u32>,
    /// Policy index of the dump request, if the op has one.
    pub dump_policy: Option<u32>,
    /// Policy index -> attribute id -> description.
    pub policies: PolicyTable,
}

impl OpPolicy {
    /// Policy of top-level attribute `attr` of the `do` request.
    pub fn do_attr(&self, attr: u16) -> Option<&PolicyDesc> {
        self.policies.get(&self.do_policy?)?.get(&attr)
    }

    /// Policy of attribute `attr` inside the nest described by `nest` (its `policy_idx`).
    pub fn nested_attr(&self, nest: &PolicyDesc, attr: u16) -> Option<&PolicyDesc> {
        self.policies.get(&nest.policy_idx?)?.get(&attr)
    }

    /// Decode the messages of a policy dump.
    pub fn decode(cmd: u8, msgs: &[GenlMsg]) -> Result<Self, DecodeError> {
        let mut p = OpPolicy { cmd, ..Default::default() };
        for m in msgs {
            for a in m.attrs()? {
                match a.ty {
                    CTRL_ATTR_OP_POLICY => {
                        for op in a.nested_attrs()? {
                            if op.ty as u32 != cmd as u32 {
                                continue;
                            }
                            for x in op.nested_attrs()? {
                                match x.ty {
                                    CTRL_ATTR_POLICY_DO => p.do_policy = Some(x.u32()?),
                                    CTRL_ATTR_POLICY_DUMP => p.dump_policy = Some(x.u32()?),
                                    _ => {}
                                }
                            }
                        }
                    }
                    CTRL_ATTR_POLICY => {
                        for idx in a.nested_attrs()? {
                            let table = p.policies.entry(idx.ty as u32).or_default();
                            for attr in idx.nested_attrs()? {
                                table.insert(attr.ty, PolicyDesc::decode(attr.payload)?);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(p)
    }
}

/// `CTRL_CMD_GETFAMILY` by name (a `do` with ack).
pub fn getfamily_request(name: &str, seq: u32) -> Request {
    let mut b = RequestBuilder::genl(
        GENL_ID_CTRL,
        NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
        "ctrl-getfamily",
        &CTRL_SET,
    );
    b.put_str(CTRL_ATTR_FAMILY_NAME, name);
    b.finish()
}

/// `CTRL_CMD_GETPOLICY` dump for one op of a family.
pub fn getpolicy_request(family_id: u16, cmd: u8, seq: u32) -> Request {
    let mut b = RequestBuilder::genl(
        GENL_ID_CTRL,
        NLM_F_DUMP,
        seq,
        CTRL_CMD_GETPOLICY,
        CTRL_VERSION,
        "ctrl-getpolicy",
        &CTRL_SET,
    );
    b.put_u16(CTRL_ATTR_FAMILY_ID, family_id);
    b.put_u32(CTRL_ATTR_OP, cmd as u32);
    b.finish()
}

fn malformed(op: &'static str, e: DecodeError) -> Error {
    Error::Malformed { op, iface: "-".into(), what: e.0 }
}

/// Resolve a family by name. `Ok(None)` when the kernel has no such family (`ENOENT`).
pub fn resolve_family(sock: &mut NlSocket, name: &str) -> Result<Option<Family>> {
    let req = getfamily_request(name, 0);
    match sock.transact(req, Mode::Do, "-") {
        Ok(msgs) => {
            let m = msgs.first().ok_or_else(|| Error::Malformed {
                op: "ctrl-getfamily",
                iface: "-".into(),
                what: format!("no family message for {name}"),
            })?;
            Family::decode(m).map(Some).map_err(|e| malformed("ctrl-getfamily", e))
        }
        Err(Error::Kernel { errno, .. }) if errno == errno::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}

/// Dump the policies of op `cmd` of family `family_id`.
pub fn op_policy(sock: &mut NlSocket, family_id: u16, cmd: u8) -> Result<OpPolicy> {
    let msgs = sock.transact(getpolicy_request(family_id, cmd, 0), Mode::Dump, "-")?;
    OpPolicy::decode(cmd, &msgs).map_err(|e| malformed("ctrl-getpolicy", e))
}

/// Convenience: every attribute of a policy table, flattened for printing.
pub fn flatten(p: &OpPolicy) -> BTreeMap<(u32, u16), PolicyDesc> {
    let mut out = BTreeMap::new();
    for (idx, t) in &p.policies {
        for (a, d) in t {
            out.insert((*idx, *a), d.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::{NlaType, genl_messages};
    use crate::sys::recorded::*;

    #[test]
    fn golden_getfamily_request() {
        // Hand check: len 32, type 0x10 (nlctrl), flags REQUEST|ACK, seq 1, pid 0;
        // genl cmd 3 (GETFAMILY) version 2; attr len 11 type 2 "netdev\0" + 1 pad byte.
        #[rustfmt::skip]
        let want: &[u8] = &[
            0x20, 0, 0, 0, 0x10, 0, 0x05, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            3, 2, 0, 0,
            11, 0, 2, 0, b'n', b'e', b't', b'd', b'e', b'v', 0, 0,
        ];
        assert_eq!(getfamily_request("netdev", 1).bytes, want);
        assert_eq!(getfamily_request("netdev", 1).bytes, REQ_GETFAMILY_NETDEV);
        assert_eq!(getfamily_request("ethtool", 13).bytes, REQ_GETFAMILY_ETHTOOL);
    }

    #[test]
    fn golden_getpolicy_request() {
        // len 36; type 0x10; flags REQUEST|DUMP (0x301); seq 2; cmd 10 version 2;
        // FAMILY_ID u16 20 (len 6, padded to 8); OP u32 13.
        #[rustfmt::skip]
        let want: &[u8] = &[
            0x24, 0, 0, 0, 0x10, 0, 0x01, 0x03, 2, 0, 0, 0, 0, 0, 0, 0,
            10, 2, 0, 0,
            6, 0, 1, 0, 20, 0, 0, 0,
            8, 0, 10, 0, 13, 0, 0, 0,
        ];
        assert_eq!(getpolicy_request(20, 13, 2).bytes, want);
        assert_eq!(getpolicy_request(20, 13, 2).bytes, REQ_GETPOLICY_BIND_RX);
    }

    #[test]
    fn decode_recorded_netdev_family() {
        let msgs = genl_messages(REPLY_GETFAMILY_NETDEV_0);
        let f = Family::decode(&msgs[0]).unwrap();
        assert_eq!(f.name, "netdev");
        assert_eq!(f.id, 20);
        assert_eq!(f.version, 1);
        assert_eq!(f.hdrsize, 0);
        assert_eq!(f.maxattr, 0);
        let ids: Vec<u32> = f.ops.iter().map(|o| o.id).collect();
        assert_eq!(ids, vec![1, 5, 10, 11, 12, 13, 14, 15]);
        let rx = f.op(13).unwrap();
        assert_eq!(rx.flags, 0x0b);
        assert!(rx.admin_perm());
        assert_eq!(rx.flags_str(), "ADMIN_PERM|CAP_DO|CAP_HASPOL");
        let tx = f.op(15).unwrap();
        assert_eq!(tx.flags, 0x0a);
        assert!(!tx.admin_perm());
        let groups: Vec<(&str, u32)> = f.mcast_groups.iter().map(|g| (g.name.as_str(), g.id)).collect();
        assert_eq!(groups, vec![("mgmt", 4), ("page-pool", 5)]);
    }

    #[test]
    fn decode_recorded_ethtool_family() {
        let msgs = genl_messages(REPLY_GETFAMILY_ETHTOOL_0);
        let f = Family::decode(&msgs[0]).unwrap();
        assert_eq!(f.name, "ethtool");
        assert_eq!(f.id, 21);
        // ETHTOOL_MSG_RINGS_GET = 15 is a do/dump op.
        assert!(f.op(15).unwrap().can_do());
    }

    #[test]
    fn decode_recorded_bind_rx_policy() {
        let msgs = genl_messages(REPLY_GETPOLICY_BIND_RX_0);
        let p = OpPolicy::decode(13, &msgs).unwrap();
        assert_eq!(p.do_policy, Some(0));
        assert_eq!(p.dump_policy, None);
        let ifindex = p.do_attr(1).unwrap();
        assert_eq!(ifindex.ty, Some(NlaType::U32));
        assert_eq!(ifindex.min_u, Some(1));
        assert_eq!(ifindex.max_u, Some(u32::MAX as u64));
        let queues = p.do_attr(2).unwrap();
        assert_eq!(queues.ty, Some(NlaType::Nested));
        assert_eq!(queues.policy_idx, Some(1));
        assert_eq!(queues.policy_maxtype, Some(3));
        let qtype = p.nested_attr(queues, 3).unwrap();
        assert_eq!(qtype.max_u, Some(1));
        assert_eq!(p.do_attr(3).unwrap().ty, Some(NlaType::U32));
        // 6.18: no rx-page-size (attr 5) yet.
        assert!(p.do_attr(5).is_none());
        assert_eq!(flatten(&p).len(), 5);
    }
}
