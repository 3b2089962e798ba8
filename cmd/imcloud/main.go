// Command imcloud runs any subset of imcloud's stages (logic, job, cloud),
// or all of them in one process with nothing else installed.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline/config"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `imcloud: a distributed real-time push server (logic -> job -> cloud).

Usage:
  imcloud standalone [--config F] [--set key=value]... [--anonymous]
                                                         every stage in one process, embedded broker
  imcloud run --config F [--stages logic,job,cloud] [--set key=value]...
  imcloud token --mid N [--rooms R1,R2] [--accepts 1000,1001] [--key K] [--recover] [--ttl D] [--config F]
  imcloud check --config F                                 validate a configuration and exit
  imcloud listen --token T [--ws URL | --tcp ADDR]         connect as a client and print what arrives
  imcloud poison list|replay|purge [--id ID]... [--all]    inspect and re-drive poisoned messages
  imcloud bench fanout|connections|push|reconnect [flags]  load a server on this machine and measure it
  imcloud version

Run "imcloud <command> --help" for a command's flags.
`

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr, os.Environ()); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code))
		}
		if !errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "imcloud:", err)
		}
		os.Exit(2)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, environ []string) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "standalone":
		return cmdServe(ctx, args, stdout, stderr, environ, true)
	case "run":
		return cmdServe(ctx, args, stdout, stderr, environ, false)
	case "token":
		return cmdToken(args, stdout, stderr, environ)
	case "check":
		return cmdCheck(args, stdout, stderr, environ)
	case "listen":
		return cmdListen(ctx, args, stdout, stderr)
	case "poison":
		return cmdPoison(ctx, args, stdout, stderr, environ)
	case "bench":
		return cmdBench(ctx, args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "imcloud", version)
		return nil
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

// configFlags are the flags every command that reads configuration takes.
type configFlags struct {
	file string
	sets []string
}

func (c *configFlags) register(fs *pflag.FlagSet) {
	fs.StringVarP(&c.file, "config", "c", "", "TOML configuration file")
	fs.StringArrayVar(&c.sets, "set", nil, "override one key, e.g. --set cloud.ws_addr=:8080 (repeatable)")
}

func (c *configFlags) load(environ []string, defaults map[string]any, extra ...string) (config.Config, error) {
	return config.Load(config.Sources{File: c.file, Environ: environ, Sets: append(c.sets, extra...), Defaults: defaults})
}

func newFlagSet(name, synopsis string, stderr io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "%s\n\nFlags:\n%s", synopsis, fs.FlagUsages())
	}
	return fs
}

func cmdCheck(args []string, stdout, stderr io.Writer, environ []string) error {
	var cf configFlags
	fs := newFlagSet("check", "imcloud check --config F: validate a configuration (file, IMCLOUD_ environment, --set) and exit.", stderr)
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := cf.load(environ, nil)
	if err != nil {
		return err
	}
	for _, w := range cfg.Exposures() {
		fmt.Fprintln(stdout, "warning:", w)
	}
	fmt.Fprintln(stdout, "configuration ok")
	return nil
}

func cmdToken(args []string, stdout, stderr io.Writer, environ []string) error {
	var (
		cf           configFlags
		mid          int64
		rooms        []string
		accepts      []int32
		key          string
		platform     string
		ttl          time.Duration
		recoverClaim bool
	)
	fs := newFlagSet("token", "imcloud token: print a client JWT signed with logic.auth.jwt_secret.", stderr)
	cf.register(fs)
	fs.Int64Var(&mid, "mid", 0, "user id (required)")
	fs.StringSliceVar(&rooms, "rooms", nil, "rooms to join, e.g. live://1000")
	fs.Int32SliceVar(&accepts, "accepts", nil, "operations to accept; empty accepts all")
	fs.StringVar(&key, "key", "", "the session's connection key (the token's key claim, not a secret); empty lets the server make one")
	fs.StringVar(&platform, "platform", "", "client platform")
	fs.DurationVar(&ttl, "ttl", 24*time.Hour, "token lifetime")
	fs.BoolVar(&recoverClaim, "recover", false, "opt the client in to positioned delivery, recovery after reconnect and acks (the recover claim)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if mid <= 0 {
		return errors.New("--mid: a positive user id is required")
	}
	if ttl <= 0 {
		return errors.New("--ttl: must be positive")
	}
	// logic refuses a token holding a claim the wire does not accept
	// (the client is closed with 4401); say so here, naming the claim.
	if len(rooms) > wire.MaxClaimRooms {
		return fmt.Errorf("--rooms: %d rooms, at most %d", len(rooms), wire.MaxClaimRooms)
	}
	for _, r := range rooms {
		if err := wire.ValidRoomGrant(r); err != nil {
			return fmt.Errorf("--rooms: %q: %w (want type://id, or a grant ending in '*' such as live://*)", r, err)
		}
	}
	if key != "" {
		if err := wire.ValidKey(key); err != nil {
			return fmt.Errorf("--key: %w", err)
		}
	}
	if err := wire.ValidPlatform(platform); err != nil {
		return fmt.Errorf("--platform: %w", err)
	}
	// The token is for clients, so only the auth settings matter here:
	// as job, neither logic's required secret nor the listeners' rules
	// apply, and an empty secret is refused below. job's timing rule
	// (config.CheckWorstCase) does: a file job would refuse is refused
	// here too.
	cfg, err := cf.load(environ, nil, "stages=job")
	if err != nil {
		return err
	}
	tok, err := token.Sign(cfg.Logic.Auth.JWTSecret, token.Claims{Mid: mid, Key: key, Rooms: rooms, Platform: platform, Accepts: accepts, Recover: recoverClaim}, ttl)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer, environ []string, standalone bool) error {
	var (
		cf        configFlags
		stages    []string
		anonymous bool
	)
	name, synopsis := "run", "imcloud run --config F [--stages logic,job,cloud]: run the stages named, with the broker and registry the configuration names."
	if standalone {
		name, synopsis = "standalone", "imcloud standalone: run logic, job and cloud in one process on the embedded broker and memory registry."
	}
	fs := newFlagSet(name, synopsis, stderr)
	cf.register(fs)
	if standalone {
		fs.BoolVar(&anonymous, "anonymous", false, "no API key: the push API listens on 127.0.0.1:3111 and takes pushes without Authorization, as goim's tools send them")
	} else {
		fs.StringSliceVar(&stages, "stages", nil, "stages to run (default: the configuration's stages)")
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	var (
		defaults map[string]any
		extra    []string
	)
	if standalone {
		// standalone fixes these; a --set of one would be silently
		// overridden (a newcomer's broker.kind=amqp ran on gochannel).
		for _, set := range cf.sets {
			key, _, _ := strings.Cut(set, "=")
			if key == "broker.kind" || key == "registry.kind" || key == "stages" {
				return fmt.Errorf("standalone runs every stage on the embedded broker and memory registry; --set %s is for imcloud run (e.g. imcloud run --stages logic,job,cloud --set %s)", key, set)
			}
		}
		// Every stage is in this process, so a random cluster secret
		// authenticates its gRPC whatever address it is bound to.
		defaults = map[string]any{"logic.auth.jwt_secret": randomHex(32), "logic.api_keys": []string{randomHex(16)}, "cluster.secret": randomHex(32),
			"cloud.demo": true}
		if anonymous {
			// Keyless only on loopback: a non-loopback logic.http_addr is
			// still refused unless logic.allow_anonymous says so.
			defaults["logic.api_keys"] = []string{}
			defaults["logic.http_addr"] = "127.0.0.1:3111"
		}
		extra = []string{"stages=logic,job,cloud", "broker.kind=" + config.BrokerGoChannel, "registry.kind=" + config.RegistryMemory}
	}
	if len(stages) > 0 {
		extra = append(extra, "stages="+strings.Join(stages, ","))
	}
	// load reads the configuration, at start and on SIGHUP.
	load := func() (config.Config, error) {
		cfg, err := cf.load(environ, defaults, extra...)
		if err == nil && standalone && cfg.Cloud.Demo && len(cfg.Logic.CORSOrigins) == 0 {
			// The demo page pushes through the API from the node's origin.
			cfg.Logic.CORSOrigins = demoOrigins(cfg.Cloud.WSAddr)
		}
		return cfg, err
	}
	cfg, err := load()
	if err != nil {
		return err
	}
	level := new(slog.LevelVar)
	logger := newLevelLogger(cfg.Log, level, stderr)
	if cfg.Events.Enabled && cfg.Broker.Kind == config.BrokerGoChannel {
		logger.Warn("events.enabled on the embedded broker (gochannel): only this process could read topics.events, and nothing in it does; run on a shared broker to consume them (README \"Events and presence\")")
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads (reload); registered before start so that an early
	// one never takes the default action, ending the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	n, err := process.Start(ctx, cfg, logger)
	if err != nil {
		return err
	}
	logger.Info("imcloud started", "version", version, "stages", cfg.Stages, "broker", cfg.Broker.Kind, "registry", cfg.Registry.Kind)
	if anonymous && len(cfg.Logic.APIKeys) > 0 {
		logger.Warn("--anonymous: logic.api_keys is set, so the push API still asks for a key")
	}
	if standalone {
		printWelcome(stdout, cfg, n.Addrs(), cfg.Logic.Auth.JWTSecret == defaults["logic.auth.jwt_secret"])
	} else {
		printAddrs(stdout, n.Addrs())
	}
	reload := func() {
		next, err := load()
		if err != nil {
			logger.Error("SIGHUP: configuration not reloaded; the running one stays", "err", err)
			return
		}
		applied, restart, err := n.Reload(next, level)
		if err != nil {
			logger.Error("SIGHUP: configuration not reloaded; the running one stays", "err", err)
			return
		}
		logger.Info("SIGHUP: configuration reloaded", "applied", applied, "reloadable", config.Reloadable)
		// The environment is the process's from its start: a key set there
		// overrides the file and is never re-read.
		var fromEnv []string
		for _, kv := range environ {
			name, _, _ := strings.Cut(kv, "=")
			for _, key := range config.Reloadable {
				if name == config.EnvPrefix+strings.ToUpper(strings.ReplaceAll(key, ".", "__")) {
					fromEnv = append(fromEnv, name)
				}
			}
		}
		if len(fromEnv) > 0 {
			logger.Warn("SIGHUP: these are set in the environment, which overrides the file and is not re-read: to rotate them, set them in the configuration file", "variables", fromEnv)
		}
		if len(restart) > 0 {
			logger.Warn("SIGHUP: these keys changed but take effect only after a restart", "keys", restart)
		}
	}
wait:
	for {
		select {
		case <-ctx.Done():
			logger.Info("shutting down")
			break wait
		case <-n.Done():
			logger.Error("stage failed, shutting down", "err", n.Err())
			break wait
		case <-hup:
			reload()
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	_ = n.Shutdown(sctx)
	return n.Err()
}

// newLevelLogger logs at level, set from c; a reload changes level.
func newLevelLogger(c config.Log, level *slog.LevelVar, w io.Writer) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(c.Level))
	level.Set(l)
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func printAddrs(w io.Writer, a process.Addrs) {
	for _, l := range []struct{ name, addr string }{
		{"logic http", a.HTTP}, {"logic grpc", a.LogicGRPC},
		{"cloud tcp", a.CloudTCP}, {"cloud ws", a.CloudWS}, {"cloud wss", a.CloudWSS}, {"cloud grpc", a.CloudGRPC},
		{"admin", a.Admin},
	} {
		if l.addr != "" {
			fmt.Fprintf(w, "  %-11s %s\n", l.name, l.addr)
		}
	}
}

// localURL makes a bound address something a local client can dial.
func localURL(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// printWelcome tells a standalone user where everything is; randomSecret
// says the JWT secret is this run's own (none was configured).
func printWelcome(w io.Writer, cfg config.Config, a process.Addrs, randomSecret bool) {
	fmt.Fprintln(w, "imcloud standalone is ready. Listening:")
	printAddrs(w, a)
	auth := ""
	if len(cfg.Logic.APIKeys) > 0 {
		fmt.Fprintf(w, "\nAPI key: %s\n", cfg.Logic.APIKeys[0])
		auth = " -H 'Authorization: Bearer " + cfg.Logic.APIKeys[0] + "'"
	} else {
		fmt.Fprintf(w, "\nNo API key: the push API takes pushes without Authorization at http://%s.\n", localURL(a.HTTP))
		fmt.Fprintf(w, "goim's push tools reach it unchanged under /goim/, e.g.:\n  curl -X POST 'http://%s/goim/push/mids?operation=1000&mids=1' -d 'hello'\n", localURL(a.HTTP))
	}
	// The auth body a client sends: a signed token, or goim's plain JSON.
	authBody := `{"mid":1,"room_id":"live://1000"}`
	if cfg.Logic.Auth.Mode == config.AuthJWT {
		tok, err := token.Sign(cfg.Logic.Auth.JWTSecret, token.Claims{Mid: 1, Rooms: []string{"live://1000"}}, 24*time.Hour)
		if err != nil {
			tok = "(none: " + err.Error() + ")"
		}
		authBody = tok
		fmt.Fprintf(w, "Client token (mid 1, room live://1000, 24h):\n  %s\n", authBody)
	}
	api := localURL(a.HTTP)
	fmt.Fprintf(w, "\nPush to user 1:\n  curl -X POST%s 'http://%s/im/push/mids?operation=1000&mids=1' -d 'hello'\n", auth, api)
	fmt.Fprintf(w, "Push to the room:\n  curl -X POST%s 'http://%s/im/push/room?operation=1000&type=live&room=1000' -d 'hello room'\n", auth, api)
	if a.CloudWS != "" {
		ws := "ws://" + localURL(a.CloudWS) + "/sub"
		fmt.Fprintf(w, "Watch it arrive:\n  %s listen --ws %s --token '%s'\n", executable(), ws, authBody)
		fmt.Fprintf(w, "Clients connect to %s and send the token as an op 7 packet (see README).\n", ws)
		if cfg.Cloud.Demo && cfg.Logic.Auth.Mode == config.AuthJWT {
			fmt.Fprintf(w, "\nDemo page (user 1 with recovery on; receives what you push, pushes with the API key):\n  %s\n", demoURL(cfg, a))
		}
	}
	if cfg.Logic.Auth.Mode == config.AuthJWT && randomSecret {
		fmt.Fprintf(w, "\nThe JWT secret is random for this run, so these tokens and links end with it. To sign your own\n"+
			"tokens with %s token, start with IMCLOUD_LOGIC__AUTH__JWT_SECRET=<at least 32 characters> and sign with the same.\n", executable())
	}
}

// demoOrigins are the origins a browser gives the demo page served on
// the cloud's WebSocket address: loopback by number and by name, or the
// address's own host.
func demoOrigins(wsAddr string) []string {
	host, port, err := net.SplitHostPort(wsAddr)
	if err != nil {
		return nil
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && (ip.IsUnspecified() || ip.IsLoopback())) {
		return []string{"http://127.0.0.1:" + port, "http://localhost:" + port, "http://[::1]:" + port}
	}
	return []string{"http://" + net.JoinHostPort(host, port)}
}

// demoURL is the demo page with a token for mid 1 (opted in to recovery),
// the push API and its key in the fragment: a fragment is never sent to
// a server, so neither lands in an access log.
func demoURL(cfg config.Config, a process.Addrs) string {
	tok, err := token.Sign(cfg.Logic.Auth.JWTSecret, token.Claims{Mid: 1, Rooms: []string{"live://1000"}, Recover: true}, 24*time.Hour)
	if err != nil {
		return "(none: " + err.Error() + ")"
	}
	frag := url.Values{"token": {tok}, "api": {"http://" + localURL(a.HTTP)}}
	if len(cfg.Logic.APIKeys) > 0 {
		frag.Set("key", cfg.Logic.APIKeys[0])
	}
	return "http://" + localURL(a.CloudWS) + "/demo#" + frag.Encode()
}

// executable is how the user ran this binary (bin/imcloud after make run),
// so the commands the welcome prints run as printed.
func executable() string {
	if len(os.Args) > 0 && os.Args[0] != "" {
		return os.Args[0]
	}
	return "imcloud"
}
