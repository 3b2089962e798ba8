// Package clusterauth authenticates the internal gRPC calls between logic,
// job and cloud: every client sends the cluster secret in its metadata and
// every server checks it in constant time, and with mutual TLS both sides
// present certificates signed by the cluster's CA.
package clusterauth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"imcloud/config"
)

// MetadataKey carries the cluster secret on every internal call.
const MetadataKey = "imcloud-cluster-secret"

// DialOptions are what an internal client (cloud -> logic, job -> cloud,
// logic -> cloud) dials with: the cluster's TLS when mutual TLS is
// configured, plaintext otherwise, and the secret on every call when one
// is set.
func DialOptions(c config.Cluster) ([]grpc.DialOption, error) {
	creds := insecure.NewCredentials()
	if c.MTLS() {
		cert, pool, err := load(c)
		if err != nil {
			return nil, err
		}
		// The server is verified against the cluster CA under the host
		// the client dials (an IP SAN for an IP address).
		creds = credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if c.Secret != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(secretCreds{secret: c.Secret, tls: c.MTLS()}))
	}
	return opts, nil
}

// ServerOptions are what logic's and cloud's gRPC servers run with: they
// require a client certificate from the cluster CA when mutual TLS is
// configured, and refuse every call without the secret when one is set,
// with codes.Unauthenticated.
func ServerOptions(c config.Cluster, logger *slog.Logger) ([]grpc.ServerOption, error) {
	var opts []grpc.ServerOption
	if c.MTLS() {
		cert, pool, err := load(c)
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{cert}, ClientCAs: pool,
			ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
		})))
	}
	if c.Secret != "" {
		ck := newChecker(c.Secret, logger)
		opts = append(opts, grpc.ChainUnaryInterceptor(ck.unary), grpc.ChainStreamInterceptor(ck.stream))
	}
	return opts, nil
}

func load(c config.Cluster) (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("cluster.tls_cert_file, cluster.tls_key_file: load the node certificate: %w", err)
	}
	ca, err := os.ReadFile(c.TLSCAFile)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("cluster.tls_ca_file: read the cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return tls.Certificate{}, nil, fmt.Errorf("cluster.tls_ca_file: %s holds no PEM certificate", c.TLSCAFile)
	}
	return cert, pool, nil
}

// secretCreds sends the secret with every call.
type secretCreds struct {
	secret string
	tls    bool
}

func (s secretCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{MetadataKey: s.secret}, nil
}

// RequireTransportSecurity is false without mutual TLS: the secret then
// travels in clear, which is why the README asks for mutual TLS across
// networks an attacker can read.
func (s secretCreds) RequireTransportSecurity() bool { return s.tls }

// errRefused is what a caller without the secret is told; it names the key
// so that a misconfigured node's operator knows what to fix.
var errRefused = status.Error(codes.Unauthenticated, "internal gRPC call refused: missing or wrong cluster secret (cluster.secret)")

// checker verifies the secret on each call and logs refusals, at most once
// per peer per logEvery and logBurst lines a second overall, so that a
// scanner cannot flood the log.
type checker struct {
	want   [sha256.Size]byte
	logger *slog.Logger

	mu      sync.Mutex
	logged  map[string]time.Time // peer host -> last refusal logged
	skipped map[string]int       // peer host -> refusals since
	lines   *rate.Limiter
}

// A misconfigured node retries every renew interval (10 s by default), so
// one line a minute per peer still shows it; the overall limiter caps what
// many peers (a scan of the network) can write.
const (
	logEvery  = time.Minute
	logPeers  = 1024 // peers remembered; the map is reset past this
	logBurst  = 10
	logPerSec = 1
)

func newChecker(secret string, logger *slog.Logger) *checker {
	return &checker{
		want: sha256.Sum256([]byte(secret)), logger: logger,
		logged: map[string]time.Time{}, skipped: map[string]int{},
		lines: rate.NewLimiter(logPerSec, logBurst),
	}
}

// check compares hashes, so the comparison takes the same time whatever
// the length of what was sent.
func (c *checker) check(ctx context.Context, method string) error {
	got, sent := "", false
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(MetadataKey); len(v) == 1 {
			got, sent = v[0], true
		}
	}
	sum := sha256.Sum256([]byte(got))
	if sent && subtle.ConstantTimeCompare(sum[:], c.want[:]) == 1 {
		return nil
	}
	reason := "missing"
	if sent {
		reason = "wrong"
	}
	c.logRefusal(ctx, method, reason)
	return errRefused
}

func (c *checker) logRefusal(ctx context.Context, method, reason string) {
	host := "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		host = p.Addr.String()
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	now := time.Now()
	c.mu.Lock()
	last, seen := c.logged[host]
	if seen && now.Sub(last) < logEvery {
		c.skipped[host]++
		c.mu.Unlock()
		return
	}
	if !c.lines.AllowN(now, 1) {
		c.mu.Unlock()
		return
	}
	if len(c.logged) >= logPeers {
		clear(c.logged)
		clear(c.skipped)
	}
	skipped := c.skipped[host]
	c.logged[host] = now
	delete(c.skipped, host)
	c.mu.Unlock()
	c.logger.Warn("refused an internal gRPC call: cluster secret "+reason,
		"peer", host, "method", method, "refused_since_last_log", skipped, "next_log_after", logEvery)
}

func (c *checker) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := c.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (c *checker) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := c.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}
