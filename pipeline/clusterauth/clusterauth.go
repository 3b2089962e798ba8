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
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"imcloud/pipeline/config"
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
	// A reply holds as much as the largest request (RenewOnline's room
	// counts), so the client takes what the server does.
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes))}
	if c.Secret != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(secretCreds{secret: c.Secret, tls: c.MTLS()}))
	}
	return opts, nil
}

// ServerOptions are what logic's and cloud's gRPC servers run with: they
// require a client certificate from the cluster CA when mutual TLS is
// configured, and refuse every call without the secret when one is set,
// with codes.Unauthenticated. Every method, the health check included: a
// call taken without the secret is read whole before any handler runs
// (up to MaxMessageBytes a stream), which the tap exists to prevent — an
// open health check let one connection with no secret pin 630 MB.
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
	opts = append(opts, limits()...)
	if c.Secret != "" {
		ck := newChecker(c.Secret, logger)
		// The tap handle checks the secret when a call's headers arrive,
		// before grpc-go reads a byte of its message: the interceptors run
		// only once the whole request is read, so on their own they let a
		// caller without the secret make the server buffer a message of
		// up to MaxMessageBytes per stream (60 such streams took logic
		// from 25 MB to 275 MB). The interceptors stay as a second check.
		opts = append(opts, grpc.InTapHandle(ck.tap),
			grpc.ChainUnaryInterceptor(ck.unary), grpc.ChainStreamInterceptor(ck.stream))
	}
	return opts, nil
}

// MaxMessageBytes bounds one internal gRPC message, in either direction.
// The largest legitimate one is a cloud node's RenewOnline report (and
// logic's reply, which counts the same rooms): one map entry per room the
// node hosts. An entry of a room of wire.MaxRoomLen (128) bytes is at most
// 140 bytes on the wire (1 tag + 2 length + 1 tag + 2 length + 128 + 1 tag
// + 5 varint). A node is sized for a few hundred thousand connections, and
// each may sit in a room of its own (a room per user is common): 64 MiB
// holds 479,000 rooms of the longest name, 1.5 million of 32 bytes. A
// report past the limit would be refused every time, dropping the node
// from the cluster, so the bound is set by the largest node, not by the
// typical message. It costs nothing against callers without the secret:
// the tap handle refuses them before a byte of their message is read.
// Every other message is far smaller: a room batch is job.room_batch_size
// (20) pushes of at most logic.max_message_bytes (4 KiB).
const MaxMessageBytes = 64 << 20

// Connection limits of logic's and cloud's gRPC servers.
const (
	// maxStreams bounds concurrent calls on one connection; a client
	// past it waits for a slot rather than failing. Job's consumers
	// (job.concurrency) and a cloud node's burst of Connect calls while
	// clients reconnect are the busiest callers; 256 leaves them room and
	// bounds what one authenticated connection can hold to 256 messages.
	maxStreams = 256
	// connectionTimeout bounds the TLS handshake and the HTTP/2 preface
	// and settings: on grpc-go's default (120 s) 2000 connections that
	// sent only the preface stayed open 70 s and more. A cluster peer
	// does both in a few round trips.
	connectionTimeout = 10 * time.Second
	// maxConnectionIdle closes a connection with no call in progress for
	// this long (grpc-go's default is never): a caller whose every call
	// is refused never has one, so it is gone within a minute. Cloud
	// nodes report every cloud.renew_interval (10 s) and keep theirs; an
	// idle job reconnects on its next push, at the cost of one handshake.
	maxConnectionIdle = time.Minute
	// pingMinTime: no internal client sends keepalive pings, so a peer
	// pinging more often than this, or with no call in progress, is sent
	// GOAWAY (too_many_pings) after its third offence.
	pingMinTime = time.Minute
)

// limits bound what any one connection can make the server hold, with or
// without the secret.
func limits() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxConcurrentStreams(maxStreams),
		grpc.ConnectionTimeout(connectionTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: maxConnectionIdle}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: pingMinTime, PermitWithoutStream: false}),
	}
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
// the length of what was sent. md is the call's incoming metadata.
func (c *checker) check(ctx context.Context, md metadata.MD, method string) error {
	got, sent := "", false
	if v := md.Get(MetadataKey); len(v) == 1 {
		got, sent = v[0], true
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

// tap runs when a call's headers arrive, before its message is read; a
// refused call is answered at once and its data is never buffered.
func (c *checker) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	return ctx, c.check(ctx, info.Header, info.FullMethodName)
}

func incoming(ctx context.Context) metadata.MD {
	md, _ := metadata.FromIncomingContext(ctx)
	return md
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
	if err := c.check(ctx, incoming(ctx), info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (c *checker) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := c.check(ss.Context(), incoming(ss.Context()), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}
