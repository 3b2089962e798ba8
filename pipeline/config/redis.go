package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"time"
)

// maxRedisAddrs bounds registry.redis.addrs: go-redis dials each it is
// given, and a few seed nodes or sentinels are all a deployment needs.
const maxRedisAddrs = 64

// maxWaitReplicas and maxWaitTimeout bound registry.redis.wait_*: a push
// waits for them while its HTTP request is open (logic.write_timeout).
const (
	maxWaitReplicas = 16
	maxWaitTimeout  = 10 * time.Second
)

// redactAddr hides what comes before an @ in an address quoted in an
// error: a URL given where host:port belongs (redis://:secret@host:6379)
// carries a password, which the error would print to the logs.
func redactAddr(a string) string {
	if i := strings.LastIndex(a, "@"); i >= 0 {
		return "…@" + a[i+1:]
	}
	return a
}

// urlHint points a URL given where host:port belongs to the keys that
// take what it carries.
func urlHint(a string) string {
	if strings.Contains(a, "://") || strings.Contains(a, "@") {
		return " (not a URL: give host:port, and any credentials in registry.redis.username and registry.redis.password, TLS in registry.redis.tls)"
	}
	return ""
}

// validate checks [registry.redis]; each error names its key. It is checked
// whatever registry.kind says: a Redis configured wrong is a mistake even
// before a process uses it.
func (r Redis) validate() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("registry.redis.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	switch r.Mode {
	case RedisSingle:
		if _, _, err := net.SplitHostPort(r.Addr); err != nil || r.Addr == "" {
			bad("addr", "%q is not host:port%s", redactAddr(r.Addr), urlHint(r.Addr))
		}
		if len(r.Addrs) > 0 {
			bad("addrs", "mode single connects to registry.redis.addr; addrs are for mode sentinel (the sentinels) or cluster (seed nodes)")
		}
	case RedisSentinel:
		if len(r.Addrs) == 0 {
			bad("addrs", "mode sentinel needs the sentinels' addresses")
		}
		if r.MasterName == "" {
			bad("master_name", "mode sentinel needs the master's name as the sentinels know it (sentinel monitor <name> ...)")
		}
	case RedisCluster:
		if len(r.Addrs) == 0 {
			bad("addrs", "mode cluster needs at least one seed node's address")
		}
		if r.DB != 0 {
			bad("db", "a Redis Cluster has only database 0, got %d", r.DB)
		}
	default:
		bad("mode", "%q is not one of %s, %s, %s", truncateKey(r.Mode), RedisSingle, RedisSentinel, RedisCluster)
	}
	// Only for a mode that is one: an unknown mode is its own error.
	if r.Mode == RedisSingle || r.Mode == RedisCluster {
		if r.MasterName != "" {
			bad("master_name", "is for mode sentinel, got mode %q", r.Mode)
		}
		for key, v := range map[string]string{"sentinel_username": r.SentinelUsername, "sentinel_password": r.SentinelPassword} {
			if v != "" {
				bad(key, "is for mode sentinel, got mode %q", r.Mode)
			}
		}
	}
	if len(r.Addrs) > maxRedisAddrs {
		bad("addrs", "%d addresses, at most %d (a few seed nodes or sentinels are enough)", len(r.Addrs), maxRedisAddrs)
	} else {
		for i, a := range r.Addrs {
			if _, _, err := net.SplitHostPort(a); err != nil || a == "" {
				bad("addrs", "address %d, %q, is not host:port%s", i+1, truncateKey(redactAddr(a)), urlHint(a))
			} else if slices.Index(r.Addrs, a) < i {
				bad("addrs", "%q is listed twice", a)
			}
		}
	}
	if r.DB < 0 {
		bad("db", "must not be negative, got %d", r.DB)
	}
	if r.WaitReplicas < 0 || r.WaitReplicas > maxWaitReplicas {
		bad("wait_replicas", "must be 0 to %d, got %d", maxWaitReplicas, r.WaitReplicas)
	}
	// WAIT takes whole milliseconds, and WAIT n 0 blocks for ever.
	if r.WaitTimeout < time.Millisecond || r.WaitTimeout > maxWaitTimeout {
		bad("wait_timeout", "must be 1ms to %s, got %s", maxWaitTimeout, r.WaitTimeout)
	}
	if strings.ContainsAny(r.Prefix, "{}") {
		bad("prefix", "%q has a brace: imcloud's keys carry their own Redis Cluster hash tags, and a brace in the prefix would change which part of a key picks its slot", truncateKey(r.Prefix))
	}
	if strings.ContainsFunc(r.Prefix, func(c rune) bool { return c < ' ' || c == 0x7f }) {
		bad("prefix", "has a control character")
	}
	if !r.TLS {
		var set []string
		for key, v := range map[string]string{"tls_ca_file": r.TLSCAFile, "tls_cert_file": r.TLSCertFile, "tls_key_file": r.TLSKeyFile, "tls_server_name": r.TLSServerName} {
			if v != "" {
				set = append(set, "registry.redis."+key)
			}
		}
		if len(set) > 0 {
			slices.Sort(set)
			bad("tls", "%s set but tls = false: set registry.redis.tls = true, or clear them", strings.Join(set, ", "))
		}
		return errs
	}
	if _, err := r.TLSConfig(); err != nil {
		errs = append(errs, err)
	}
	return errs
}

// TLSConfig is the TLS configuration registry.redis describes, nil when
// tls is off. The files are read now: validation calls it, so a file that
// does not read or parse stops start-up with its key named.
func (r Redis) TLSConfig() (*tls.Config, error) {
	if !r.TLS {
		return nil, nil
	}
	// An empty ServerName is the host of each address dialled (crypto/tls),
	// which a cluster's nodes each need; tls_server_name overrides it for
	// servers reached by IP under a certificate's DNS name.
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: r.TLSServerName}
	if r.TLSCAFile != "" {
		pem, err := os.ReadFile(r.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("registry.redis.tls_ca_file: read the CA certificates: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("registry.redis.tls_ca_file: %s holds no PEM certificate", r.TLSCAFile)
		}
		c.RootCAs = pool
	}
	switch {
	case r.TLSCertFile == "" && r.TLSKeyFile == "":
	case r.TLSCertFile == "" || r.TLSKeyFile == "":
		return nil, fmt.Errorf("registry.redis.tls_cert_file: a client certificate needs both tls_cert_file and tls_key_file")
	default:
		cert, err := tls.LoadX509KeyPair(r.TLSCertFile, r.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("registry.redis.tls_cert_file: load the client certificate and key: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}
