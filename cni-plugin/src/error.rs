//! The spec's error result: `{"cniVersion", "code", "msg", "details"}` on
//! stdout and a non-zero exit.
use serde::Serialize;

/// Well-known error codes (CNI spec 1.1.0, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    // Beeline's own codes (100+), listed in the README.
    /// The podCIDR has no free address left.
    pub const IP_EXHAUSTED: u32 = 100;
    /// The interface (or its host-side veth) already exists.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// A netlink operation failed while setting up the pod's interface.
    pub const NETLINK_FAILURE: u32 = 102;
    /// The agent refused the request.
    pub const AGENT_REFUSED: u32 = 103;
    /// The IP store on disk is unreadable or could not be written.
    pub const IPAM_STORE: u32 = 104;
    /// CHECK found the attachment different from what ADD made.
    pub const CHECK_FAILED: u32 = 105;
    /// The delegated IPAM plugin failed or could not be run.
    pub const IPAM_DELEGATE: u32 = 106;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The JSON written to stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error result serializes")
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// Maps an agent client failure to the spec's code: an unreachable agent
/// means "try again later" (the runtime retries), as does a not-ready agent.
impl From<beeline_ipam::Error> for CniError {
    fn from(e: beeline_ipam::Error) -> CniError {
        let code = match e {
            beeline_ipam::Error::NoHosts { .. } | beeline_ipam::Error::Exhausted { .. } => {
                code::IP_EXHAUSTED
            }
            beeline_ipam::Error::Io { .. } => code::IPAM_STORE,
        };
        CniError::new(code, e.to_string())
    }
}

pub fn from_agent(err: beeline_proto::ClientError) -> CniError {
    use beeline_proto::ClientError as E;
    let code = match &err {
        E::Unreachable { .. } | E::Timeout { .. } => code::TRY_AGAIN_LATER,
        E::Agent(api) if api.not_ready => code::TRY_AGAIN_LATER,
        E::Agent(_) => code::AGENT_REFUSED,
        E::Io { .. } | E::Protocol(_) => code::IO_FAILURE,
    };
    let msg = match &err {
        E::Unreachable { .. } => "the Beeline agent is down or not reachable; try again later",
        E::Timeout { .. } => "the Beeline agent is busy; try again later",
        E::Agent(api) if api.not_ready => "the Beeline agent is not ready yet; try again later",
        E::Agent(_) => "the Beeline agent refused the request",
        _ => "talking to the Beeline agent failed",
    };
    CniError::new(code, msg).with_details(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(7, "bad mtu").with_details("mtu 70000 is above 65535");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad mtu");
        assert_eq!(v["details"], "mtu 70000 is above 65535");
    }

    #[test]
    fn agent_down_is_try_again_later() {
        let err = beeline_proto::ClientError::Unreachable {
            path: "/run/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let e = from_agent(err);
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("agent is down"), "{}", e.msg);
    }
}
