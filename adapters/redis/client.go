package redis

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline/config"
)

// connectTimeout bounds Connect's first exchange with Redis.
const connectTimeout = 10 * time.Second

// Connect opens the client registry.redis describes — one server, the
// master a set of sentinels names, or a Redis Cluster — and checks that it
// answers. The stores take it as a goredis.UniversalClient whatever the
// mode; under Cluster (a *goredis.ClusterClient) they keep each script's
// keys in one slot.
func Connect(ctx context.Context, rc config.Redis) (goredis.UniversalClient, error) {
	tlsConfig, err := rc.TLSConfig()
	if err != nil {
		return nil, err
	}
	opts := &goredis.UniversalOptions{
		Username:  rc.Username,
		Password:  rc.Password,
		DB:        rc.DB,
		TLSConfig: tlsConfig,
	}
	if rc.WaitReplicas > 0 {
		// A reply is read within ReadTimeout (go-redis's default: 3 s),
		// and a pipeline whose read timed out is sent again — the appends
		// before its WAIT made twice. WAIT answers within wait_timeout.
		opts.ReadTimeout = rc.WaitTimeout + 3*time.Second
	}
	switch rc.Mode {
	case config.RedisSingle:
		opts.Addrs = []string{rc.Addr}
	case config.RedisSentinel:
		opts.Addrs, opts.MasterName = rc.Addrs, rc.MasterName
		opts.SentinelUsername, opts.SentinelPassword = rc.SentinelUsername, rc.SentinelPassword
	case config.RedisCluster:
		// IsClusterMode: one seed address is a cluster too, not a
		// single server.
		opts.Addrs, opts.IsClusterMode = rc.Addrs, true
	default:
		return nil, fmt.Errorf("redis: mode %q is not one of %s, %s, %s", rc.Mode, config.RedisSingle, config.RedisSentinel, config.RedisCluster)
	}
	c := goredis.NewUniversalClient(opts)
	// A server that takes the TLS handshake for a command waits for a
	// newline that never comes: bounded, start-up fails instead of
	// hanging on go-redis' retries.
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		_ = c.Close()
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("redis %s %s: no answer within %s (down, or tls not what the server speaks?): %w", rc.Mode, describe(rc), connectTimeout, err)
		}
		if rc.Mode == config.RedisSentinel {
			if why := askSentinels(ctx, rc, opts); why != "" {
				return nil, fmt.Errorf("redis %s %s: %s", rc.Mode, describe(rc), why)
			}
		}
		return nil, fmt.Errorf("redis %s %s: %w", rc.Mode, describe(rc), err)
	}
	return c, nil
}

// askSentinels says why a master could not be found through the
// sentinels when they answer: go-redis reports a master no sentinel knows
// as "all sentinels ... are unreachable: redis: nil". "" when none
// answered, or one knows the master (the fault is elsewhere).
func askSentinels(ctx context.Context, rc config.Redis, opts *goredis.UniversalOptions) string {
	answered := 0
	for _, addr := range rc.Addrs {
		sc := goredis.NewSentinelClient(&goredis.Options{Addr: addr, Username: rc.SentinelUsername, Password: rc.SentinelPassword,
			TLSConfig: opts.TLSConfig, MaxRetries: -1, DialTimeout: 2 * time.Second})
		_, err := sc.GetMasterAddrByName(ctx, rc.MasterName).Result()
		_ = sc.Close()
		switch {
		case err == nil:
			return ""
		case errors.Is(err, goredis.Nil):
			answered++
		}
	}
	if answered == 0 {
		return ""
	}
	return fmt.Sprintf("%d of %d sentinels answered, and none knows a master named %q (registry.redis.master_name; SENTINEL MASTERS lists the names they monitor)", answered, len(rc.Addrs), rc.MasterName)
}

// describe names where a mode connects, for errors and logs; never a
// credential.
func describe(rc config.Redis) string {
	switch rc.Mode {
	case config.RedisSingle:
		return rc.Addr
	case config.RedisSentinel:
		return fmt.Sprintf("master %q via %s", rc.MasterName, strings.Join(rc.Addrs, ","))
	}
	return strings.Join(rc.Addrs, ",")
}

// clustered reports whether rdb spreads keys over a Redis Cluster's slots,
// where one script may only touch keys of one slot.
func clustered(rdb goredis.UniversalClient) bool {
	_, ok := rdb.(*goredis.ClusterClient)
	return ok
}

// clusterSlots is the number of Redis Cluster hash slots.
const clusterSlots = 16384

// keySlot is the Redis Cluster slot of key (CLUSTER KEYSLOT): CRC16 of its
// hash tag — what is between the first '{' and the first '}' after it,
// when that is not empty — or else of the whole key, modulo 16384.
// go-redis has one but keeps it internal.
func keySlot(key string) int {
	if open := strings.IndexByte(key, '{'); open >= 0 {
		if n := strings.IndexByte(key[open+1:], '}'); n > 0 {
			key = key[open+1 : open+1+n]
		}
	}
	return int(crc16(key) % clusterSlots)
}

// crc16 is CRC-16/XMODEM (polynomial 0x1021, initial value 0), the one
// Redis Cluster hashes keys with.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

// scriptCall is one call of a script: its keys and arguments.
type scriptCall struct {
	keys []string
	args []any
}

// runScripts runs script once for each call and returns their commands, in
// order. One call goes alone (Script.Run: EVALSHA, then EVAL if Redis lost
// the script); several share one pipeline, which go-redis' ClusterClient
// sends to each call's node at once. Calls Redis answers NOSCRIPT (the
// script flushed, or a node restarted or promoted: every call to it) are
// run again in one pipeline once the script is loaded — on every master
// under Cluster — rather than each sending the script's text.
func runScripts(ctx context.Context, rdb goredis.UniversalClient, script *goredis.Script, calls []scriptCall) []*goredis.Cmd {
	cmds := make([]*goredis.Cmd, len(calls))
	if len(calls) == 1 {
		cmds[0] = script.Run(ctx, rdb, calls[0].keys, calls[0].args...)
		return cmds
	}
	evalSha := func(which []int) {
		pipe := rdb.Pipeline()
		for _, i := range which {
			cmds[i] = script.EvalSha(ctx, pipe, calls[i].keys, calls[i].args...)
		}
		// Each command carries its own outcome.
		_, _ = pipe.Exec(ctx)
	}
	all := make([]int, len(calls))
	for i := range all {
		all[i] = i
	}
	evalSha(all)
	var lost []int
	for i, cmd := range cmds {
		if goredis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
			lost = append(lost, i)
		}
	}
	if len(lost) == 0 {
		return cmds
	}
	if err := script.Load(ctx, rdb).Err(); err != nil {
		// Each call's NOSCRIPT stands; the next batch tries again.
		return cmds
	}
	evalSha(lost)
	return cmds
}

// errReplicaWait marks a call runScriptsWait made whose writes too few
// replicas acknowledged: the script ran, and its result is in the
// command's Val.
var errReplicaWait = errors.New("wait for replicas")

// scriptNode is where runScriptsWait sends calls: the client itself, or
// under Cluster the master of the calls' slot.
type scriptNode interface {
	goredis.Scripter
	Pipeline() goredis.Pipeliner
}

// runScriptsWait is runScripts, then WAIT on each connection that ran
// calls: a call whose writes fewer than replicas replicas acknowledged
// within timeout fails. Redis replicates asynchronously; a master that
// dies with writes not yet sent to its replica loses them when the
// replica is promoted, and for the history that is a position given twice
// (the second message taken for the first at the cloud node). WAIT is the
// only way to know a write reached a replica, and it only counts the
// writes of its own connection: hence one pipeline a master, calls and
// WAIT together.
func runScriptsWait(ctx context.Context, rdb goredis.UniversalClient, script *goredis.Script, calls []scriptCall, replicas int, timeout time.Duration) []*goredis.Cmd {
	cmds := make([]*goredis.Cmd, len(calls))
	groups := map[scriptNode][]int{}
	var nodes []scriptNode
	if cc, ok := rdb.(*goredis.ClusterClient); ok {
		for i, c := range calls {
			m, err := cc.MasterForKey(ctx, c.keys[0])
			if err != nil {
				cmds[i] = goredis.NewCmd(ctx)
				cmds[i].SetErr(fmt.Errorf("find the master of %s: %w", c.keys[0], err))
				continue
			}
			if _, ok := groups[m]; !ok {
				nodes = append(nodes, m)
			}
			groups[m] = append(groups[m], i)
		}
	} else {
		nodes = []scriptNode{rdb}
		for i := range calls {
			groups[rdb] = append(groups[rdb], i)
		}
	}
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() { runOnNode(ctx, n, script, calls, groups[n], cmds, replicas, timeout) })
	}
	wg.Wait()
	return cmds
}

// runOnNode runs the calls which on node in one pipeline ending in WAIT,
// and those Redis answered NOSCRIPT again (the script loaded) in another.
func runOnNode(ctx context.Context, node scriptNode, script *goredis.Script, calls []scriptCall, which []int, cmds []*goredis.Cmd, replicas int, timeout time.Duration) {
	run := func(which []int) {
		pipe := node.Pipeline()
		for _, i := range which {
			cmds[i] = script.EvalSha(ctx, pipe, calls[i].keys, calls[i].args...)
		}
		wait := pipe.Do(ctx, "wait", replicas, timeout.Milliseconds())
		_, _ = pipe.Exec(ctx) // each command carries its own outcome
		n, err := wait.Int64()
		if err == nil && int(n) < replicas {
			err = fmt.Errorf("%d of %d replicas acknowledged within %s", n, replicas, timeout)
		}
		if err == nil {
			return
		}
		err = fmt.Errorf("%w: %w", errReplicaWait, err)
		for _, i := range which {
			if cmds[i].Err() == nil {
				cmds[i].SetErr(err)
			}
		}
	}
	run(which)
	var lost []int
	for _, i := range which {
		if goredis.HasErrorPrefix(cmds[i].Err(), "NOSCRIPT") {
			lost = append(lost, i)
		}
	}
	if len(lost) == 0 {
		return
	}
	if err := script.Load(ctx, node).Err(); err != nil {
		return // each call's NOSCRIPT stands; the next batch tries again
	}
	run(lost)
}

// CheckReplicas returns an error naming every master of rdb with fewer
// than want connected replicas: with registry.redis.wait_replicas above
// what a master has, every push positioned on it would wait its
// wait_timeout and be refused, while the process looked healthy.
func CheckReplicas(ctx context.Context, rdb goredis.UniversalClient, want int) error {
	if want <= 0 {
		return nil
	}
	var mu sync.Mutex
	var short []string
	check := func(ctx context.Context, c *goredis.Client) error {
		info, err := c.Info(ctx, "replication").Result()
		if err != nil {
			return fmt.Errorf("redis %s: read its replicas: %w", c.Options().Addr, err)
		}
		n := -1
		for line := range strings.SplitSeq(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_slaves:"); ok {
				n, _ = strconv.Atoi(v)
			}
		}
		if n < want {
			mu.Lock()
			short = append(short, fmt.Sprintf("%s has %d", c.Options().Addr, max(n, 0)))
			mu.Unlock()
		}
		return nil
	}
	if err := forEachMaster(ctx, rdb, check); err != nil {
		return fmt.Errorf("check replicas: %w", err)
	}
	if len(short) > 0 {
		slices.Sort(short)
		return fmt.Errorf("registry.redis.wait_replicas = %d, but %s connected replica(s): every push positioned there would wait registry.redis.wait_timeout and be refused (503); give each master more replicas than wait_replicas (one more, to outlive a failover), or lower it", want, strings.Join(short, ", "))
	}
	return nil
}

// forEachMaster calls fn with each master's client: every master of a
// Redis Cluster (at once, as go-redis does), or the one server.
func forEachMaster(ctx context.Context, rdb goredis.UniversalClient, fn func(context.Context, *goredis.Client) error) error {
	switch c := rdb.(type) {
	case *goredis.ClusterClient:
		return c.ForEachMaster(ctx, fn)
	case *goredis.Client:
		return fn(ctx, c)
	default:
		return fmt.Errorf("a %T has no masters to visit", rdb)
	}
}
