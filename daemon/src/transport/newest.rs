//! Which of a peer's connections is its current one.
//!
//! The accepting side checks hellos concurrently, so the hello of a
//! connection its dialer abandoned (a handshake cut short by a life change,
//! or one that timed out) can finish after that of its replacement. Taken
//! as the newer one, it replaced the live connection's routes, then closed:
//! nothing but heartbeats reached the peer any more (issue 13: a member
//! waited a minute for a recovery report that its peer sent, and re-sent,
//! into the dead connection, and the continuity benchmark failed in CI).
//! So connections are numbered as they begin — dialled, or seen by the
//! endpoint, which is the order their dialer made them in — and a route
//! follows the newest.

use std::collections::HashMap;
use std::hash::Hash;

/// Per key (a peer, or one link to it), the route of its newest connection.
#[derive(Debug)]
pub struct Newest<K, T> {
    routes: HashMap<K, Route<T>>,
}

#[derive(Debug)]
struct Route<T> {
    /// The number of the newest connection installed: it stays after that
    /// connection is gone, so an older one found later is still refused.
    seq: u64,
    value: Option<T>,
}

impl<K, T> Default for Newest<K, T> {
    fn default() -> Self {
        Newest {
            routes: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq, T> Newest<K, T> {
    /// Makes connection `seq`'s `value` the route for `key`, unless a newer
    /// connection was installed there: then gives `value` back.
    pub fn install(&mut self, key: K, seq: u64, value: T) -> Result<(), T> {
        match self.routes.get_mut(&key) {
            Some(route) if route.seq > seq => Err(value),
            Some(route) => {
                route.seq = seq;
                route.value = Some(value);
                Ok(())
            }
            None => {
                self.routes.insert(
                    key,
                    Route {
                        seq,
                        value: Some(value),
                    },
                );
                Ok(())
            }
        }
    }

    /// The current route for `key`.
    pub fn get(&self, key: &K) -> Option<&T> {
        self.routes.get(key).and_then(|r| r.value.as_ref())
    }

    /// The current route for `key` is gone (its connection closed); a newer
    /// connection installs the next.
    pub fn clear(&mut self, key: &K) {
        if let Some(route) = self.routes.get_mut(key) {
            route.value = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_connection_finishing_its_hello_late_does_not_take_the_route() {
        let mut routes = Newest::default();
        assert_eq!(routes.install("m1", 2, "new"), Ok(()));
        assert_eq!(routes.install("m1", 1, "abandoned"), Err("abandoned"));
        assert_eq!(routes.get(&"m1"), Some(&"new"));
        // Gone, the newest still bars the older one; a newer one comes in.
        routes.clear(&"m1");
        assert_eq!(routes.get(&"m1"), None);
        assert_eq!(routes.install("m1", 1, "abandoned"), Err("abandoned"));
        assert_eq!(routes.install("m1", 3, "redialled"), Ok(()));
        assert_eq!(routes.get(&"m1"), Some(&"redialled"));
        // Keys are apart.
        assert_eq!(routes.install("m2", 0, "other"), Ok(()));
        assert_eq!(routes.get(&"m1"), Some(&"redialled"));
    }
}
